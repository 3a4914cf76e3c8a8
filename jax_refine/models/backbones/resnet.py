"""ResNet backbones (NHWC, Flax linen) returning a dict of multi-scale features.

Parameter names mirror torchvision so that conversion is a readable table: `conv1`, `bn1`,
`layer{i}_{j}` (block j of stage i) with `conv1..3`, `bn1..3`, `downsample_conv`,
`downsample_bn`. Padding is explicit and symmetric everywhere (PyTorch's), max-pooling pads
with -inf, BatchNorm uses PyTorch's eps 1e-5 and momentum 0.1 (Flax momentum 0.9), and
`axis_name` turns BatchNorm into synchronised BatchNorm over a mapped/sharded axis.

Bucketed inputs: when `valid_size` (rows, cols; ints or traced int32) is given, only the
top-left `valid_size` region of the input is real and everything else is filler. Every
spatial convolution and the max-pool then see zeros outside the valid region of their input
(zero padding for convolutions; for the max-pool the input is post-ReLU, so a zero equals
PyTorch's -inf padding), which makes the valid region of every feature map *exactly* the
result of running the network on the unpadded input. The valid size of each feature is
given by `feature_valid_sizes`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
Size = Any  # int or traced int32 scalar

STEMS = ("torchvision", "deeplab", "v1c")


def conv_out_size(n: Size, kernel: int, stride: int, pad: int, dilation: int = 1) -> Size:
    """PyTorch's output length of a convolution / pooling window along one axis."""
    return (n + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def feature_valid_sizes(
    valid_size: tuple[Size, Size], strides: Sequence[int], num_stages: int
) -> dict[str, tuple[Size, Size]]:
    """Valid (rows, cols) of each feature returned by `ResNet` for an input of `valid_size`."""

    def down(size: tuple[Size, Size], stride: int) -> tuple[Size, Size]:
        # Every strided op in the network (7x7/3x3 with pad k//2, 1x1 with pad 0, pool 3/2/1)
        # maps n to (n - 1) // stride + 1.
        return tuple(conv_out_size(n, 1, stride, 0) for n in size)

    sizes = {"stem": down(valid_size, 2)}
    size = down(sizes["stem"], 2)
    for i in range(num_stages):
        size = down(size, strides[i])
        sizes[f"layer{i + 1}"] = size
    return sizes


def mask_valid(x: Array, valid_size: tuple[Size, Size] | None) -> Array:
    """Zero every position of [B, H, W, C] outside the top-left `valid_size` block."""
    if valid_size is None:
        return x
    rows = jnp.arange(x.shape[1]) < valid_size[0]
    cols = jnp.arange(x.shape[2]) < valid_size[1]
    keep = rows[:, None] & cols[None, :]
    return jnp.where(keep[None, :, :, None], x, jnp.zeros((), x.dtype))


def _conv_init():
    # The reference initialises convolutions with N(0, 2 / (k * k * out_channels)).
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


Pairs = tuple[tuple[int, int], tuple[int, int]]


def _conv_forward(x: Array, kernel: Array, strides, padding: Pairs, dilation) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


# Input channels from which `conv2d` computes a k x k kernel gradient per tap on CPU (1x1:
# always).
PER_TAP_MIN_CHANNELS = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(
    x: Array,
    kernel: Array,
    strides: tuple[int, int],
    padding: Pairs,
    dilation: tuple[int, int],
) -> Array:
    """`lax.conv_general_dilated` on x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] (NHWC/HWIO).

    The value and the input gradient are XLA's. The kernel gradient is chosen by backend
    inside the backward pass (`jax.lax.platform_dependent`, resolved when the step is lowered,
    so an export for CUDA or TPU holds only the accelerator branch):

    * CPU: for a 1x1 convolution, and a k x k one with at least `PER_TAP_MIN_CHANNELS` input
      channels, `per_tap_kernel_grad` (one matrix product per kernel tap, a `lax.scan`):
      2-16x faster than XLA:CPU's kernel-gradient convolution at ResNet-50's wide layers
      (benchmarks/README.md, "Training"); on narrower k x k layers XLA's is as fast or faster
      and is kept.
    * GPU, TPU and any other backend: XLA's kernel-gradient convolution (cuDNN / the TPU
      convolution emitter). The per-tap scan lowers to a while loop of small serialised
      matmuls there (43 loops in the paper's CRM step), and the whole step was measured
      faster without it on an H200 (DESIGN.md, section 7).

    Both compute the same sums up to float32 summation order.
    """
    return _conv_forward(x, kernel, strides, padding, dilation)


def _conv2d_fwd(x, kernel, strides, padding, dilation):
    return _conv_forward(x, kernel, strides, padding, dilation), (x, kernel)


def xla_kernel_grad(
    x: Array, kernel: Array, grad: Array, strides: tuple[int, int], padding: Pairs,
    dilation: tuple[int, int],
) -> Array:
    """XLA's kernel gradient [kh, kw, Cin, Cout] of `conv2d(x, kernel)` for the output
    gradient `grad` [B, rows, cols, Cout] (a convolution; linear, so kernel's values are
    unused)."""
    _, vjp = jax.vjp(lambda k: _conv_forward(x, k, strides, padding, dilation), kernel)
    return vjp(grad)[0]


def per_tap_kernel_grad(
    x: Array, kernel: Array, grad: Array, strides: tuple[int, int], padding: Pairs,
    dilation: tuple[int, int],
) -> Array:
    """The kernel gradient [kh, kw, Cin, Cout] as one matrix product per kernel tap.

    The output gradient grad [B, rows, cols, Cout] transposed once to [Cout, B*rows*cols]
    times the tap's strided view of the padded input [B*rows*cols, Cin], in a `lax.scan` over
    the taps (one view live at a time): the operand layouts XLA:CPU's matmul takes without
    copies. Same sums as `xla_kernel_grad` up to float32 summation order.
    """
    kh, kw, cin, cout = kernel.shape
    rows, cols = grad.shape[1:3]
    (sy, sx), (dy, dx) = strides, dilation
    grad_t = grad.reshape(-1, cout).T  # [Cout, B*rows*cols], shared by every tap
    # Pad, then split each spatial axis into (position // stride, position % stride): the tap
    # at offset (r0, c0) reads rows r0 + sy*i = sy*(r0 // sy + i) + r0 % sy, a unit-stride
    # window of phase r0 % sy.
    b, h, w = x.shape[:3]
    hp = -(-(h + sum(padding[0])) // sy) * sy
    wp = -(-(w + sum(padding[1])) // sx) * sx
    xp = jnp.pad(x, ((0, 0), (padding[0][0], hp - h - padding[0][0]),
                     (padding[1][0], wp - w - padding[1][0]), (0, 0)))
    xp = xp.reshape(b, hp // sy, sy, wp // sx, sx, cin)
    offsets = np.array([(ky * dy, kx * dx) for ky in range(kh) for kx in range(kw)], np.int32)

    def tap(_, offset):  # [Cout, Cin]
        r0, c0 = offset[0], offset[1]
        start = (0, r0 // sy, r0 % sy, c0 // sx, c0 % sx, 0)
        view = jax.lax.dynamic_slice(xp, start, (b, rows, 1, cols, 1, cin))
        return None, grad_t @ view.reshape(-1, cin)

    _, taps = jax.lax.scan(tap, None, jnp.asarray(offsets))
    return taps.transpose(0, 2, 1).reshape(kernel.shape)


def _conv2d_bwd(strides, padding, dilation, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x: _conv_forward(x, kernel, strides, padding, dilation), x)
    kh, kw, cin, _ = kernel.shape
    xla, per_tap = (functools.partial(f, strides=strides, padding=padding, dilation=dilation)
                    for f in (xla_kernel_grad, per_tap_kernel_grad))
    if kh * kw > 1 and cin < PER_TAP_MIN_CHANNELS:
        return vjp(grad)[0], xla(x, kernel, grad)
    return vjp(grad)[0], jax.lax.platform_dependent(x, kernel, grad, cpu=per_tap, default=xla)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """A bias-free square convolution with PyTorch's symmetric padding (via `conv2d`).

    Its parameter is `kernel` [k, k, Cin, features], as a bias-free `nn.Conv`'s.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    kernel_init: Any = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype
        )
        p = self.padding
        return conv2d(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,) * 2,
            ((p, p), (p, p)), (self.dilation,) * 2,
        )


class _Block(nn.Module):
    """Fields shared by the residual blocks.

    Attributes:
      planes: BasicBlock: output channels; Bottleneck: width of the 3x3 convolution (the
        block outputs 4 * planes channels).
      stride: stride of the (first) 3x3 convolution (Bottleneck v1.5: not of the first 1x1).
      dilation: dilation (and padding) of the 3x3 convolution(s).
      downsample: whether the shortcut is a strided 1x1 convolution + BN.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    expansion = 1

    def shortcut(self, x: Array, conv, norm) -> Array:
        """The identity, or the strided 1x1 convolution + BN when `downsample`."""
        if not self.downsample:
            return x
        x = conv(self.planes * self.expansion, 1, self.stride, 0, 1, name="downsample_conv")(x)
        return norm(name="downsample_bn")(x)


class BasicBlock(_Block):
    """ResNet basic block (two 3x3 convolutions), expansion 1.

    `dilation` dilates both 3x3 convolutions; `MMSegBasicBlock` dilates only the first.
    """

    dilate_conv2 = True

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, valid_size=None) -> Array:
        conv, norm = _layers(self, train)
        d = self.dilation
        out = conv(self.planes, 3, self.stride, d, d, name="conv1")(mask_valid(x, valid_size))
        out = nn.relu(norm(name="bn1")(out))
        out_valid = None
        if valid_size is not None:
            out_valid = tuple(conv_out_size(n, 3, self.stride, d, d) for n in valid_size)
        d2 = d if self.dilate_conv2 else 1
        out = conv(self.planes, 3, 1, d2, d2, name="conv2")(mask_valid(out, out_valid))
        out = norm(name="bn2")(out)
        return nn.relu(out + self.shortcut(x, conv, norm))


class MMSegBasicBlock(BasicBlock):
    """mmsegmentation's BasicBlock: `dilation` dilates conv1 only (conv2 is 3x3, padding 1)."""

    dilate_conv2 = False


class Bottleneck(_Block):
    """ResNet v1.5 bottleneck (1x1 -> 3x3 (strided, dilated) -> 1x1), expansion 4."""

    expansion = 4

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, valid_size=None) -> Array:
        conv, norm = _layers(self, train)
        d = self.dilation
        out = nn.relu(norm(name="bn1")(conv(self.planes, 1, 1, 0, 1, name="conv1")(x)))
        out = conv(self.planes, 3, self.stride, d, d, name="conv2")(mask_valid(out, valid_size))
        out = nn.relu(norm(name="bn2")(out))
        out = norm(name="bn3")(conv(self.planes * 4, 1, 1, 0, 1, name="conv3")(out))
        return nn.relu(out + self.shortcut(x, conv, norm))


def _layers(module: nn.Module, train: bool):
    """Conv and BatchNorm factories with the module's dtypes and PyTorch conventions."""

    def conv(features: int, kernel: int, stride: int, pad: int, dilation: int, name: str):
        return Conv(
            features,
            kernel,
            stride,
            pad,
            dilation,
            kernel_init=_conv_init(),
            dtype=module.dtype,
            param_dtype=module.param_dtype,
            name=name,
        )

    def norm(name: str):
        return batch_norm(module, train, name)

    return conv, norm


def batch_norm(module: nn.Module, train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's eps 1e-5 and momentum 0.1 (Flax 0.9), using the calling
    module's `dtype`, `param_dtype` and `axis_name` (SyncBN over that axis when training)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        axis_name=module.axis_name,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )


class ResNet(nn.Module):
    """A configurable ResNet returning {'stem', 'layer1', ...} features (NHWC).

    Attributes:
      block: `BasicBlock` or `Bottleneck`.
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      width: channels of the stem and of the first stage's blocks (64 in torchvision);
        stage i uses width * 2**i (times the block expansion at its output).
      in_channels: input channels (checked; 4 for CRM's image + mask input).
      strides: stride of each stage's first block.
      dilations: dilation of each stage's blocks after the first.
      first_dilations: dilation of each stage's first block; None = all 1 (the CascadePSP /
        CRM rule: the first block of a dilated stage is not dilated).
      multi_grid: per-block dilation multipliers of the last stage (detectron2 DeepLab's
        RES5_MULTI_GRID): block j of the last stage uses dilations[-1] * multi_grid[j],
        first block included (first_dilations is then ignored for that stage). None = off.
      num_stages: how many stages to compute (CRM computes 3 and never runs layer4).
      stem: 'torchvision' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), 'deeplab' (three 3x3
        conv-BN-ReLU 'conv1..3' / 'bn1..3', the first strided, width, width, 2 * width
        channels, then the max-pool; detectron2's DeepLab stem) or 'v1c' (the same with
        width // 2, width // 2, width channels; mmsegmentation's ResNetV1c deep stem).
      axis_name: BatchNorm statistics are averaged over this axis (SyncBN) when training.
    Returns (from __call__): dict with 'stem' [B, ceil(H/2), ceil(W/2), stem channels]
      (after ReLU, before pooling) and 'layer{i}' for i <= num_stages.
    """

    block: type[nn.Module]
    stage_sizes: Sequence[int]
    width: int = 64
    in_channels: int = 3
    strides: Sequence[int] = (1, 2, 2, 2)
    dilations: Sequence[int] = (1, 1, 1, 1)
    first_dilations: Sequence[int] | None = None
    multi_grid: Sequence[int] | None = None
    num_stages: int = 4
    stem: str = "torchvision"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        valid_size: tuple[Size, Size] | None = None,
        from_stage: int = 0,
        to_stage: int | None = None,
        scan_blocks: bool = False,
    ) -> dict[str, Array]:
        """Features of x: [B, H, W, in_channels]; valid_size: see the module docstring.

        A sub-range of the network: with from_stage=k > 0, x is layer{k}'s output and only
        layer{k+1}.. are computed; to_stage stops after layer{to_stage} (default
        num_stages). The dict holds the features computed. valid_size always refers to the
        network's input (running stages in separate calls bounds peak memory).

        scan_blocks (inference only, ignored when training or initialising): a stage's
        identical blocks after its first run as one `lax.scan` over their parameters,
        stacked inside the call (the parameter tree is unchanged). Same operations and
        results; XLA then reuses one buffer pair for the blocks' outputs instead of
        placing each at a new heap offset, which bounds the peak memory of large inputs.
        """
        if from_stage == 0 and x.shape[-1] != self.in_channels:
            raise ValueError(f"ResNet expects {self.in_channels} input channels, got {x.shape}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; expected one of {STEMS}")
        if not 1 <= self.num_stages <= len(self.stage_sizes):
            raise ValueError(f"num_stages={self.num_stages} not in 1..{len(self.stage_sizes)}")
        conv, norm = _layers(self, train)
        valid = None
        if valid_size is not None:
            valid = feature_valid_sizes(valid_size, self.strides, self.num_stages)
        to_stage = self.num_stages if to_stage is None else to_stage
        scan = scan_blocks and not train and not self.is_initializing()
        if from_stage > 0:
            return self._stages(x, train, valid, from_stage, to_stage, {}, scan)
        x = mask_valid(x, valid_size)
        if self.stem == "torchvision":
            x = nn.relu(norm(name="bn1")(conv(self.width, 7, 2, 3, 1, name="conv1")(x)))
        else:
            w = self.width if self.stem == "deeplab" else self.width // 2
            x = nn.relu(norm(name="bn1")(conv(w, 3, 2, 1, 1, name="conv1")(x)))
            x = mask_valid(x, valid and valid["stem"])
            x = nn.relu(norm(name="bn2")(conv(w, 3, 1, 1, 1, name="conv2")(x)))
            x = mask_valid(x, valid and valid["stem"])
            x = nn.relu(norm(name="bn3")(conv(2 * w, 3, 1, 1, 1, name="conv3")(x)))
        features = {"stem": x}
        # Post-ReLU values are >= 0, so zeros outside the valid region act as -inf padding.
        x = mask_valid(x, valid and valid["stem"])
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return self._stages(x, train, valid, 0, to_stage, features, scan)

    def _stages(self, x, train, valid, from_stage, to_stage, features, scan):
        """Run layer{from_stage+1}..layer{to_stage} on x (the max-pool's or a stage's output)."""
        in_features = x.shape[-1]
        block_valid = None
        if valid is not None:
            if from_stage == 0:
                block_valid = tuple(conv_out_size(n, 3, 2, 1) for n in valid["stem"])
            else:
                block_valid = valid[f"layer{from_stage}"]
        first_dilations = self.first_dilations or (1,) * len(self.stage_sizes)
        last = len(self.stage_sizes) - 1
        if self.multi_grid is not None and len(self.multi_grid) != self.stage_sizes[last]:
            raise ValueError(f"multi_grid={self.multi_grid} needs {self.stage_sizes[last]} entries")
        for i in range(from_stage, to_stage):
            planes = self.width * 2**i
            blocks = []
            for j in range(self.stage_sizes[i]):
                stride = self.strides[i] if j == 0 else 1
                dilation = first_dilations[i] if j == 0 else self.dilations[i]
                if i == last and self.multi_grid is not None:
                    dilation = self.dilations[i] * self.multi_grid[j]
                blocks.append(self.block(
                    planes=planes,
                    stride=stride,
                    dilation=dilation,
                    downsample=j == 0
                    and (stride != 1 or in_features != planes * self.block.expansion),
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{i + 1}_{j}",
                ))
                in_features = planes * self.block.expansion
            x = blocks[0](x, train=train, valid_size=block_valid)
            if valid is not None:
                block_valid = valid[f"layer{i + 1}"]
            rest = blocks[1:]
            if scan and len(rest) > 1 and len({b.dilation for b in rest}) == 1:
                x = self._scan(rest, x, block_valid)
            else:
                for block in rest:
                    x = block(x, train=train, valid_size=block_valid)
            features[f"layer{i + 1}"] = x
        return features

    def _scan(self, blocks: Sequence[nn.Module], x: Array, valid_size) -> Array:
        """Eval-mode `block_n(...block_1(x))` for identical blocks as one lax.scan."""
        stacked = {
            col: jax.tree_util.tree_map(
                lambda *leaves: jnp.stack(leaves),
                *[self.variables[col][b.name] for b in blocks],
            )
            for col in ("params", "batch_stats")
        }
        template = blocks[0].clone(parent=None, name=None)

        def body(carry: Array, variables: dict[str, Any]) -> tuple[Array, None]:
            return template.apply(variables, carry, train=False, valid_size=valid_size), None

        return jax.lax.scan(body, x, stacked)[0]


ResNet18 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 23, 3))

DEPTHS = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101}
