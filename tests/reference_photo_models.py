"""Independent references for the photo networks, written without ffclip's modules.

Weights are dicts in the released layouts (e4e's `encoder.*`, `model_ir_se50.pth`, FFCLIP's face-parsing `unet`),
filled with seeded stand-in values; the forward passes are plain tensor operations over those dicts, following
encoder4editing's `Encoder4Editing` and `Backbone` and FFCLIP's `unet` and losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

UNITS_50 = [(64, 64, 2)] + [(64, 64, 1)] * 2 + [(64, 128, 2)] + [(128, 128, 1)] * 3 + [(128, 256, 2)] + \
    [(256, 256, 1)] * 13 + [(256, 512, 2)] + [(512, 512, 1)] * 2


class Weights:
    """A seeded filler of a released-layout state dict."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.state: dict[str, torch.Tensor] = {}

    def randn(self, name: str, *shape: int, scale: float = 1.0, mean: float = 0.0) -> None:
        # Drawn in float32, three times quicker than float64 (the e4e stand-ins hold 10^8 values).
        self.state[name] = (mean + scale * torch.randn(*shape, generator=self.gen)).to(self.dtype)

    def conv(self, name: str, cin: int, cout: int, k: int, bias: bool = True, gain: float = 1.0) -> None:
        self.randn(f"{name}.weight", cout, cin, k, k, scale=gain / math.sqrt(cin * k * k))
        if bias:
            self.randn(f"{name}.bias", cout, scale=0.1)

    def bn(self, name: str, ch: int) -> None:
        self.randn(f"{name}.weight", ch, scale=0.1, mean=1.0)
        self.randn(f"{name}.bias", ch, scale=0.1)
        self.randn(f"{name}.running_mean", ch, scale=0.1)
        var = 0.5 + torch.rand(ch, generator=self.gen, dtype=torch.float64)
        self.state[f"{name}.running_var"] = var.to(self.dtype)
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def prelu(self, name: str, ch: int) -> None:
        self.randn(f"{name}.weight", ch, scale=0.05, mean=0.25)


def _irse_weights(w: Weights, prefix: str) -> None:
    w.conv(f"{prefix}input_layer.0", 3, 64, 3, bias=False)
    w.bn(f"{prefix}input_layer.1", 64)
    w.prelu(f"{prefix}input_layer.2", 64)
    for i, (cin, cout, stride) in enumerate(UNITS_50):
        p = f"{prefix}body.{i}."
        if cin != cout:
            w.conv(p + "shortcut_layer.0", cin, cout, 1, bias=False)
            w.bn(p + "shortcut_layer.1", cout)
        w.bn(p + "res_layer.0", cin)
        w.conv(p + "res_layer.1", cin, cout, 3, bias=False)
        w.prelu(p + "res_layer.2", cout)
        w.conv(p + "res_layer.3", cout, cout, 3, bias=False, gain=0.5)
        w.bn(p + "res_layer.4", cout)
        w.conv(p + "res_layer.5.fc1", cout, cout // 16, 1, bias=False)
        w.conv(p + "res_layer.5.fc2", cout // 16, cout, 1, bias=False)


def head_spatial(i: int) -> int:
    return 16 if i < 3 else 32 if i < 7 else 64


def e4e_weights(n_styles: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The `encoder.*` tensors of an e4e checkpoint with `n_styles` style heads."""
    w = Weights(seed, dtype)
    _irse_weights(w, "encoder.")
    for i in range(n_styles):
        for j in range(int(math.log2(head_spatial(i)))):
            w.conv(f"encoder.styles.{i}.convs.{2 * j}", 512, 512, 3, gain=1.5)
        w.randn(f"encoder.styles.{i}.linear.weight", 512, 512)
        w.randn(f"encoder.styles.{i}.linear.bias", 512, scale=0.1)
    w.conv("encoder.latlayer1", 256, 512, 1)
    w.conv("encoder.latlayer2", 128, 512, 1)
    return w.state


def arcface_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A `model_ir_se50.pth` state dict."""
    w = Weights(seed, dtype)
    _irse_weights(w, "")
    w.bn("output_layer.0", 512)
    w.randn("output_layer.3.weight", 512, 512 * 49, scale=1 / math.sqrt(512 * 49))
    w.randn("output_layer.3.bias", 512, scale=0.1)
    w.bn("output_layer.4", 512)
    return w.state


def parser_weights(seed: int = 0, dtype: torch.dtype = torch.float32, base: int = 16, classes: int = 19) -> dict:
    """A state dict of FFCLIP's face-parsing `unet(feature_scale=64 // base, n_classes=classes)`."""
    w = Weights(seed, dtype)
    f = [base * 2**i for i in range(5)]

    def double(name: str, cin: int, cout: int) -> None:
        for j, c in ((1, cin), (2, cout)):
            w.conv(f"{name}.conv{j}.0", c, cout, 3)
            w.bn(f"{name}.conv{j}.1", cout)

    for i, (cin, cout) in enumerate([(3, f[0]), (f[0], f[1]), (f[1], f[2]), (f[2], f[3])]):
        double(f"conv{i + 1}", cin, cout)
    double("center", f[3], f[4])
    for i in (4, 3, 2, 1):
        double(f"up_concat{i}.conv", f[i], f[i - 1])
        w.randn(f"up_concat{i}.up.weight", f[i], f[i - 1], 2, 2, scale=1 / math.sqrt(f[i]))
        w.randn(f"up_concat{i}.up.bias", f[i - 1], scale=0.1)
    w.conv("final", f[0], classes, 1)
    return w.state


def _bn(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = 1 / torch.sqrt(s[f"{name}.running_var"] + 1e-5)
    return (x - s[f"{name}.running_mean"].view(shape)) * (inv * s[f"{name}.weight"]).view(shape) + s[f"{name}.bias"].view(shape)


def _prelu(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, a.view(1, -1, 1, 1) * x)


def _irse_body(x: torch.Tensor, s: dict, prefix: str) -> list[torch.Tensor]:
    x = _prelu(_bn(F.conv2d(x, s[f"{prefix}input_layer.0.weight"], padding=1), s, f"{prefix}input_layer.1"),
               s[f"{prefix}input_layer.2.weight"])
    outs = []
    for i, (cin, cout, stride) in enumerate(UNITS_50):
        p = f"{prefix}body.{i}."
        if cin == cout:
            short = F.max_pool2d(x, 1, stride)
        else:
            short = _bn(F.conv2d(x, s[p + "shortcut_layer.0.weight"], stride=stride), s, p + "shortcut_layer.1")
        r = _bn(x, s, p + "res_layer.0")
        r = _prelu(F.conv2d(r, s[p + "res_layer.1.weight"], padding=1), s[p + "res_layer.2.weight"])
        r = _bn(F.conv2d(r, s[p + "res_layer.3.weight"], stride=stride, padding=1), s, p + "res_layer.4")
        g = F.adaptive_avg_pool2d(r, 1)
        g = torch.sigmoid(F.conv2d(F.relu(F.conv2d(g, s[p + "res_layer.5.fc1.weight"])), s[p + "res_layer.5.fc2.weight"]))
        x = r * g + short
        outs.append(x)
    return outs


def ref_e4e(s: dict, latent_avg: torch.Tensor, photos: torch.Tensor, n_styles: int) -> torch.Tensor:
    """e4e's W+ codes with the average latent added, from the `encoder.*` tensors."""
    outs = _irse_body(photos, s, "encoder.")
    c1, c2, c3 = outs[6], outs[20], outs[23]

    def head(i: int, x: torch.Tensor) -> torch.Tensor:
        for j in range(int(math.log2(head_spatial(i)))):
            x = F.leaky_relu(F.conv2d(x, s[f"encoder.styles.{i}.convs.{2 * j}.weight"],
                                      s[f"encoder.styles.{i}.convs.{2 * j}.bias"], stride=2, padding=1), 0.01)
        weight = s[f"encoder.styles.{i}.linear.weight"] / math.sqrt(512)
        return x.reshape(-1, 512) @ weight.t() + s[f"encoder.styles.{i}.linear.bias"]

    def up_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    w = head(0, c3)[:, None, :].repeat(1, n_styles, 1)
    p2 = up_add(c3, F.conv2d(c2, s["encoder.latlayer1.weight"], s["encoder.latlayer1.bias"]))
    p1 = up_add(p2, F.conv2d(c1, s["encoder.latlayer2.weight"], s["encoder.latlayer2.bias"]))
    for i in range(1, n_styles):
        w[:, i] = w[:, i] + head(i, c3 if i < 3 else p2 if i < 7 else p1)
    return w + latent_avg.reshape(-1, 512)


def ref_arcface(s: dict, faces: torch.Tensor) -> torch.Tensor:
    """ArcFace IR-SE50 embeddings, unit norm."""
    x = _bn(_irse_body(faces, s, "")[-1], s, "output_layer.0").flatten(1)
    x = _bn(x @ s["output_layer.3.weight"].t() + s["output_layer.3.bias"], s, "output_layer.4")
    return x / torch.sqrt((x * x).sum(1, keepdim=True))


def ref_parser(s: dict, images: torch.Tensor) -> torch.Tensor:
    """The face-parsing UNet's logits."""

    def double(name: str, x: torch.Tensor) -> torch.Tensor:
        for j in (1, 2):
            x = F.conv2d(x, s[f"{name}.conv{j}.0.weight"], s[f"{name}.conv{j}.0.bias"], padding=1)
            x = F.relu(_bn(x, s, f"{name}.conv{j}.1"))
        return x

    skips, x = [], images
    for i in range(1, 5):
        x = double(f"conv{i}", x)
        skips.append(x)
        x = F.max_pool2d(x, 2)
    x = double("center", x)
    for i in (4, 3, 2, 1):
        up = F.conv_transpose2d(x, s[f"up_concat{i}.up.weight"], s[f"up_concat{i}.up.bias"], stride=2)
        x = double(f"up_concat{i}.conv", torch.cat([skips[i - 1], up], 1))
    return F.conv2d(x, s["final.weight"], s["final.bias"])


def ref_identity_loss(embed, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FFCLIP's identity loss: mean over the batch of 1 - <f(y_hat), f(y)>, each image pooled to 256, cropped to
    rows 35:223 and columns 32:220, and pooled to 112 before `embed`."""

    def feats(x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 256:
            x = F.adaptive_avg_pool2d(x, 256)
        return embed(F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], 112))

    a, b = feats(y_hat), feats(y).detach()
    return sum(1 - a[i].dot(b[i]) for i in range(y.shape[0])) / y.shape[0]


def ref_background_loss(parse, x: torch.Tensor, x_hat: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """FFCLIP's background loss: MSE of both images where neither parse (at 512 px) finds hair (class 13)."""

    def keep(img: torch.Tensor) -> torch.Tensor:
        labels = parse(F.adaptive_avg_pool2d(img, 512)).argmax(1, keepdim=True)
        return F.adaptive_avg_pool2d((labels != 13).to(img.dtype), size)

    mask = ((keep(x) + keep(x_hat)) == 2).to(x.dtype)
    return F.mse_loss(x * mask, x_hat * mask)
