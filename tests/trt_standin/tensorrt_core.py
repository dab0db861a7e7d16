"""A CPU stand-in for TensorRT's compiled core (`import tensorrt`), just large enough to run
NVIDIA's unmodified pure-Python `tensorrt.plugin` package over it (docs/tensorrt.md).

It is copied to `SOMEDIR/tensorrt/__init__.py`, NVIDIA's `plugin/` folder beside it. It holds
what that package touches: the enums (names and values from NvInferRuntime*.h and
NvInferPythonPlugin.h), plugin fields as the Python bindings expose them (`PluginField.data` is a
1-D numpy array of the field's type, as many elements as the field has), a symbolic expression
builder for shape and launch expressions, tensor descriptors, the plugin interfaces as empty
bases, and a plugin registry keyed by (name, version, namespace). No builder, no kernels: the
driver in `standin.py` plays the parts of onnx-tensorrt's importer and of the builder.
"""

import enum
import operator

import numpy as np

__version__ = "11.1.0"  # the TensorRT release whose Python plugin layer this stands under


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity
        self.messages = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))


class DataType(enum.IntEnum):  # nvinfer1::DataType
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


float32, float16, int8, int32, bool, uint8, bfloat16, int64 = (
    DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL, DataType.UINT8,
    DataType.BF16, DataType.INT64)

_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
       DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}


def nptype(t):
    return _NP[t]


class TensorFormat(enum.IntEnum):  # nvinfer1::TensorFormat
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class PluginFieldType(enum.IntEnum):  # nvinfer1::PluginFieldType
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


_FIELD_NP = {PluginFieldType.FLOAT16: np.float16, PluginFieldType.FLOAT32: np.float32,
             PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT8: np.int8, PluginFieldType.INT16: np.int16,
             PluginFieldType.INT32: np.int32, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8,
             PluginFieldType.UNKNOWN: np.int8}


class PluginField:
    """name, data (1-D numpy array of the field type; bytes become int8), type, size."""

    def __init__(self, name="", data=None, type=PluginFieldType.UNKNOWN):
        self.name, self.type = name, type
        dtype = _FIELD_NP[type]
        if isinstance(data, (bytes, bytearray)):
            self.data = np.frombuffer(bytes(data), dtype=np.int8).astype(dtype)
        else:
            self.data = np.ascontiguousarray(np.asarray([] if data is None else data).reshape(-1), dtype=dtype)

    @property
    def size(self):
        return self.data.size


class PluginFieldCollection(list):
    pass


class TensorRTPhase(enum.IntEnum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.IntEnum):  # NvInferPythonPlugin.h
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class PreviewFeature(enum.IntEnum):
    PROFILE_SHARING_0806 = 0
    ALIASED_PLUGIN_IO_10_03 = 1
    RUNTIME_ACTIVATION_RESIZE_10_10 = 2


class PluginArgType(enum.IntEnum):
    INT = 0


class PluginArgDataType(enum.IntEnum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


class DimensionOperation(enum.IntEnum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_OPS = {DimensionOperation.SUM: operator.add, DimensionOperation.PROD: operator.mul,
        DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: operator.sub,
        DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
        DimensionOperation.FLOOR_DIV: operator.floordiv, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A symbolic integer: a constant, a named dimension (e.g. the dynamic row count) or an
    operation on two expressions. `evaluate({"rows": 8})` gives its value."""

    def __init__(self, value=None, name=None, op=None, args=()):
        self.value, self.name, self.op, self.args = value, name, op, tuple(args)

    def is_constant(self):
        return self.value is not None

    def get_constant_value(self):
        if self.value is None:
            raise ValueError("not a constant expression")
        return self.value

    def evaluate(self, env):
        if self.value is not None:
            return self.value
        if self.name is not None:
            return env[self.name]
        a, b = (x.evaluate(env) for x in self.args)
        return _OPS[self.op](a, b)

    def __repr__(self):
        if self.value is not None:
            return str(self.value)
        if self.name is not None:
            return self.name
        return f"{self.op.name}({self.args[0]!r}, {self.args[1]!r})"


class IExprBuilder:
    def constant(self, value):
        return IDimensionExpr(value=int(value))

    def symbol(self, name):
        return IDimensionExpr(name=name)

    def operation(self, op, first, second):
        if first.is_constant() and second.is_constant():  # TensorRT folds constant operations
            return IDimensionExpr(value=_OPS[op](first.value, second.value))
        return IDimensionExpr(op=op, args=(first, second))

    def declare_size_tensor(self, output_index, opt, upper):
        raise NotImplementedError("size tensors are not part of this stand-in")


class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape=()):
        super().__init__([0] * shape if isinstance(shape, int) else list(shape))


class DimsExprs(list):
    def __init__(self, n=0):
        super().__init__([None] * n)


class PluginTensorDesc:
    def __init__(self):
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0


class DynamicPluginTensorDesc:
    def __init__(self, desc=None, min=(), opt=(), max=()):
        self.desc = desc if desc is not None else PluginTensorDesc()
        self.min, self.opt, self.max = Dims(min), Dims(opt), Dims(max)


class _Interface:
    def __init__(self, *args, **kwargs):
        pass


class ISymExpr(_Interface):
    pass


class ITensor(_Interface):
    pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class IKernelLaunchParams:
    """What getLaunchParams fills: grid, block and shared memory as ISymExprs."""

    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = None
        self.shared_mem = None


class ISymExprs:
    """The extra scalar kernel arguments; the count is set before the entries."""

    def __init__(self):
        self.nbSymExprs = 0
        self._exprs = {}

    def __setitem__(self, index, expr):
        if not 0 <= index < self.nbSymExprs:
            raise IndexError(f"extra argument {index} of {self.nbSymExprs}")
        self._exprs[index] = expr

    def __getitem__(self, index):
        return self._exprs[index]

    def __len__(self):
        return self.nbSymExprs


class IPluginRegistry:
    """Creators keyed by (name, version, namespace); registering a key twice fails, as in TensorRT."""

    def __init__(self):
        self.all_creators = []

    @staticmethod
    def _key(creator):
        return creator.name, creator.plugin_version, creator.plugin_namespace

    def register_creator(self, creator, namespace=""):
        if any(self._key(c) == self._key(creator) for c in self.all_creators):
            return False
        self.all_creators.append(creator)
        return True

    def deregister_creator(self, creator):
        if creator in self.all_creators:
            self.all_creators.remove(creator)
            return True
        return False

    def get_creator(self, name, version, namespace=""):
        return next((c for c in self.all_creators if self._key(c) == (name, version, namespace)), None)


_REGISTRY = IPluginRegistry()


def get_plugin_registry():
    return _REGISTRY
