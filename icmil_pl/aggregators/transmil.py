"""TransMIL: correlated MIL with a transformer and a pyramid position encoding (Shao et al., NeurIPS 2021)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_modules.io import check, check_choice

from .base import Aggregator, MILOutput, check_dropout, check_positive
from .layers import embedding

# One-instance bags per batch in `instance_logits`: bounds memory without a per-instance loop.
_INSTANCE_CHUNK = 4096


class _SelfAttention(nn.Module):
    """Multi-head self-attention, exact, through `scaled_dot_product_attention` (flash / memory-efficient kernels:
    no N x N matrix is materialised on GPU)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, n, dim) -> (B, n, dim) and, if asked, the cls token's attention over the other n - 1 tokens (B, n - 1),
        averaged over heads: softmax(q_cls . k / sqrt(d)) with the cls key left out, a 1 x n product per head."""
        b, n, dim = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each (B, heads, n, d)
        out = self._mix(q, k, v).transpose(1, 2).reshape(b, n, dim)
        attention = None
        if cls_attention:
            scores = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).float() * self.scale  # (B, heads, 1, n - 1)
            attention = scores.softmax(-1).mean(1).squeeze(1)
        return self.to_out(out), attention

    def _mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)


class _NystromAttention(_SelfAttention):
    """Nystromformer attention as TransMIL uses it (lucidrains' `NystromAttention`): zero tokens padded in front to a
    multiple of `landmarks`, landmarks = means of consecutive q / k segments, softmax(Q Kl) pinv(softmax(Ql Kl))
    softmax(Ql K) V, plus a depthwise conv residual over the values (kernel 33 along the sequence).

    The Moore-Penrose iteration runs in float32 (bf16 breaks it) and its initial scaling is taken per bag, which
    equals the reference for one bag and keeps bags independent when `instance_logits` batches them.
    """

    def __init__(self, dim: int, heads: int, dropout: float, landmarks: int, pinv_iterations: int) -> None:
        super().__init__(dim, heads, dropout)
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.res_conv = nn.Conv2d(heads, heads, (33, 1), padding=(16, 0), groups=heads, bias=False)

    def _mix(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        mix = self._mix_short if q.shape[2] < self.landmarks else self._mix_landmarks
        return mix(q, k, v) + self.res_conv(v)  # the zero tokens in front add nothing to the residual conv

    def _mix_landmarks(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = q.shape[2]
        padded = math.ceil(n / self.landmarks) * self.landmarks
        q, k, v = (F.pad(t, (0, 0, padded - n, 0)) for t in (q, k, v))
        q = q * self.scale
        q_landmarks, k_landmarks = (t.unflatten(2, (self.landmarks, -1)).mean(3) for t in (q, k))
        attn1 = (q @ k_landmarks.transpose(-1, -2)).softmax(-1)
        attn2 = (q_landmarks @ k_landmarks.transpose(-1, -2)).softmax(-1)
        attn3 = (q_landmarks @ k.transpose(-1, -2)).softmax(-1)
        with torch.autocast(q.device.type, enabled=False):
            attn2 = attn2.float()
            magnitude = attn2.abs()
            scale = magnitude.sum(-1).amax(dim=(1, 2)) * magnitude.sum(-2).amax(dim=(1, 2))
            attn2_inv = _iterative_pinv(attn2, scale, self.pinv_iterations).to(attn1.dtype)
        return ((attn1 @ attn2_inv) @ (attn3 @ v))[:, :, -n:]

    def _mix_short(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`_mix_landmarks` for n < landmarks, exactly and in O(n^2) instead of O(landmarks^3).

        There every padded token is its own landmark, so all three softmax matrices are the attention A over the m
        tokens, p = m - n of them zero. The zero tokens are interchangeable: A, every pseudo-inverse iterate and the
        output live on span(e_1 .. e_n, 1_zeros / sqrt(p)), so the whole computation runs on that (n + 1)-dim basis.
        """
        n, m = q.shape[2], self.landmarks
        p = m - n
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            s = (q * self.scale) @ k.transpose(-1, -2)  # (B, heads, n, n)
            log_z = torch.logsumexp(F.pad(s, (0, 1), value=math.log(p)), dim=-1, keepdim=True)
            real = (s - log_z).exp()  # A between real tokens
            on_zeros = (math.log(p) - log_z).exp()  # (B, heads, n, 1): a real row's total weight on the zero tokens
            top = torch.cat([real, on_zeros / math.sqrt(p)], dim=-1)
            bottom = torch.full_like(top[:, :, :1], math.sqrt(p) / m)
            bottom[..., -1] = p / m
            a = torch.cat([top, bottom], dim=2)  # A on the basis, (B, heads, n + 1, n + 1)
            # the reference's scaling: max row sum (a zero token's row sums to 1) x max column sum of |A|
            row_sum = (real.sum(-1) + on_zeros.squeeze(-1)).amax(dim=(1, 2)).clamp(min=1.0)
            col_sum = torch.cat([real.sum(-2), on_zeros.sum(-2) / p], dim=-1).amax(dim=(1, 2)) + p / m
            a_inv = _iterative_pinv(a, row_sum * col_sum, self.pinv_iterations)
            out = (a[:, :, :n] @ a_inv) @ (a[:, :, :, :n] @ v)
        return out.to(v.dtype)


def _iterative_pinv(x: Tensor, scale: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of each matrix of x (B, heads, m, m) by the iteration of Razavi et al. 2014 (as
    the Nystromformer), started at x^T / scale with one scale (B,) per bag."""
    z = x.transpose(-1, -2) / scale.view(-1, 1, 1, 1)
    identity = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * identity - xz @ (15 * identity - xz @ (7 * identity - xz)))
    return z


class _TransLayer(nn.Module):
    """Pre-norm residual attention; TransMIL's layers have no feed-forward block."""

    def __init__(self, attention: _SelfAttention, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        out, attention = self.attention(self.norm(x), cls_attention)
        return x + out, attention


class PPEG(nn.Module):
    """Pyramid position encoding generator: the tokens laid on a square grid, plus depthwise 7/5/3 convolutions."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, s, padding=s // 2, groups=dim) for s in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        """(B, 1 + side**2, dim) with the cls token first -> same shape."""
        cls_token, grid = x[:, :1], x[:, 1:].transpose(1, 2).unflatten(2, (side, side))
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(Aggregator):
    """fc(in_dim -> hidden_dim, ReLU); tokens padded to a square grid by repeating the first ones; a cls token; a
    transformer layer, PPEG, a second layer; layer norm and a linear head on the cls token.

    `attention="full"` is exact multi-head attention (memory-efficient kernels); `"nystrom"` is the paper's Nystrom
    approximation with `num_landmarks` (default hidden_dim // 2) and `pinv_iterations`. `dropout` acts on the attention
    output as in the reference. `attention` output: the cls token's exact softmax attention over the instance tokens
    in the last layer, averaged over heads, with each padding token's weight added to the instance it repeats (in
    nystrom mode too, where it is the attention the approximation stands in for).
    `instance_logits` is exact: the N one-instance bags run through the bag path as one batch, chunked.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 512,
        num_heads: int = 8,
        dropout: float = 0.1,
        attention: Literal["full", "nystrom"] = "full",
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
    ) -> None:
        super().__init__(in_dim, num_classes)
        check_positive(hidden_dim=hidden_dim, num_heads=num_heads, pinv_iterations=pinv_iterations)
        check_dropout(dropout)
        check_choice("attention", attention, ("full", "nystrom"))
        check("hidden_dim", hidden_dim % num_heads == 0, f"a multiple of num_heads={num_heads}", hidden_dim)
        landmarks = hidden_dim // 2 if num_landmarks is None else num_landmarks
        check_positive(num_landmarks=landmarks)

        def attention_module() -> _SelfAttention:
            if attention == "full":
                return _SelfAttention(hidden_dim, num_heads, dropout)
            return _NystromAttention(hidden_dim, num_heads, dropout, landmarks, pinv_iterations)

        self.embed = embedding(in_dim, hidden_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = _TransLayer(attention_module(), hidden_dim)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = _TransLayer(attention_module(), hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def _forward(self, h: Tensor) -> MILOutput:
        logits, attention = self._bags(self.embed(h).unsqueeze(0), cls_attention=True)
        return MILOutput(logits[0], attention[0])

    def _instance_logits(self, h: Tensor) -> Tensor:
        z = self.embed(h).unsqueeze(1)  # (N, 1, hidden): N one-instance bags
        return torch.cat([self._bags(chunk)[0] for chunk in z.split(_INSTANCE_CHUNK)])

    def _bags(self, z: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """Equal-sized bags (B, n, hidden) -> logits (B, C) and, if asked, instance attention (B, n)."""
        b, n, _ = z.shape
        side = math.isqrt(n - 1) + 1
        padding = side * side - n
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(z.dtype), z, z[:, :padding]], dim=1)
        x, _ = self.layer1(x)
        x, attention = self.layer2(self.ppeg(x, side), cls_attention)
        logits = self.classifier(self.norm(x[:, 0]))
        if attention is not None:
            attention = torch.cat([attention[:, :padding] + attention[:, n:], attention[:, padding:n]], dim=1)
        return logits, attention
