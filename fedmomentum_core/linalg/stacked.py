"""The stacked factors of ΔW = X_B X_Aᵀ, one side at a time, for L same-shaped layers (a single
layer is a batch of one).

``X_l = X_raw,l · diag(c_l)``: X_raw,l is the tall (m x R for B, n x R for A) concatenation of
layer l's client factors, cast to the compute dtype while it is copied, and c_l the per-column
coefficients (c_B·c_A = p_k s_k for client k's columns). Grams and products scale the small
R x R / R x k operands by c instead of touching the big factors. On the Triton backend nothing is
concatenated: the kernels read the per-client factors through pointer tables.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

import fedmomentum_kernels as K
from fedmomentum_kernels import reference as _ref

from ..validate import LayerInput

__all__ = ["Stacked", "column_coeffs", "gram_into", "stack_dense"]


def column_coeffs(layers: list[LayerInput], side: str, split: str = "sqrt") -> torch.Tensor:
    """Per-column coefficients, L x R fp64, with c_B·c_A = c_k for client k's columns.

    ``split="sqrt"``: B side sign(c_k)√|c_k|, A side √|c_k|. ``split="shorter"``: the whole c_k on
    the shorter side (A when n ≤ m) and 1 on the other, so prescaled stacks copy the longer side
    without a scaling pass."""
    if split == "shorter":
        split = "right" if layers[0].n <= layers[0].m else "left"
    rows = []
    for inp in layers:
        col: list[float] = []
        for c, r in zip(inp.coeffs, inp.ranks):
            if split == "sqrt":
                v = math.sqrt(abs(c))
                col += [math.copysign(v, c) if side == "left" else v] * r
            else:
                col += [c if side == split else 1.0] * r
        rows.append(col)
    return torch.tensor(rows, dtype=torch.float64, device=layers[0].device)


def stack_dense(inp: LayerInput, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat, A_cat) = ([c_1 B_1 | …], [d_1 A_1; …]) of one layer, explicit, with
    c_k = sign(p_k s_k)·√|p_k s_k| and d_k = √|p_k s_k|; clients with weight 0 are left out."""
    keep = [k for k, c in enumerate(inp.coeffs) if c != 0.0]
    cs = [inp.coeffs[k] for k in keep]
    if not keep:
        return (torch.zeros(inp.m, 0, dtype=dtype, device=inp.device),
                torch.zeros(0, inp.n, dtype=dtype, device=inp.device))
    cb = [math.copysign(math.sqrt(abs(c)), c) for c in cs]
    ca = [math.sqrt(abs(c)) for c in cs]
    return (_ref._stack([inp.B[k] for k in keep], cb, "left", dtype),
            _ref._stack([inp.A[k] for k in keep], ca, "right", dtype))


def gram_into(x: torch.Tensor, out: torch.Tensor, symmetric_min_r: int) -> None:
    """``out = xᵀx`` for a tall x (rows x R). From ``symmetric_min_r`` on, the symmetry is used:
    the top-left block and the bottom block row are two GEMMs (3/4 of the full product's FLOPs)
    and the top-right block is the transpose of the bottom-left one."""
    R = x.shape[1]
    if R < symmetric_min_r:
        torch.mm(x.T, x, out=out)
        return
    h = R // 2
    a = x[:, :h]
    torch.mm(a.T, a, out=out[:h, :h])
    torch.mm(x[:, h:].T, x, out=out[h:, :])
    out[:h, h:].copy_(out[h:, :h].T)


@dataclass
class Stacked:
    """One side ("left": X_B, "right": X_A) of L same-shaped layers' stacked factors.

    Build it with :meth:`build`. Fields: ``c`` (L x R fp64 column coefficients; all ones once
    ``unit``), ``raw`` (torch backend: per layer the stored stack, m x R for left, R x n for right,
    a view into ``full`` which has ``extra`` spare columns/rows after the R stacked ones), ``grams``
    (torch backend with ``gram=True``: L x R x R Grams of the stacks as stored).
    """

    layers: list
    side: str
    dtype: torch.dtype
    c: torch.Tensor
    unit: bool
    rows: int
    R: int
    device: torch.device
    backend: str
    raw: Optional[list] = None
    full: Optional[list] = None
    grams: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, layers: list[LayerInput], side: str, coeffs: torch.Tensor, dtype: torch.dtype, *,
              extra: int = 0, prescale: bool = False, gram: bool = True,
              buffer: Optional[torch.Tensor] = None, gram_out: Optional[torch.Tensor] = None,
              symmetric_min_r: int = 64) -> "Stacked":
        """Stack ``layers``' factors of one side.

        ``prescale=True`` multiplies each client's block by its coefficient while copying it (c is
        then all ones): the stacks are X itself, as a stacked remainder needs. ``extra`` spare
        columns (left) / rows (right) after the R stacked ones receive the remainder's −US / Vᵀ
        in place (:meth:`append`). ``gram=True`` forms each layer's Gram right after its stack,
        while that stack is still in cache. ``buffer`` (flat, at least L·rows·(R+extra) elements)
        is scratch memory to write the stacks into; only for stacks nothing returned will view.
        """
        inp0 = layers[0]
        device = inp0.device
        rows = inp0.m if side == "left" else inp0.n
        R = inp0.R
        st = cls(layers=list(layers), side=side, dtype=dtype, c=coeffs, unit=False, rows=rows, R=R,
                 device=device, backend=K.select_backend(device))
        if st.backend != "torch":
            return st
        # left: m x R per layer (interleaving copy); right: R x n (row blocks: plain memcpy), used
        # through transposed views so the A side is never transposed in memory. One buffer per
        # layer, not one L x ... block: a residual viewing layer l's stack keeps only that layer
        # alive.
        cvals = coeffs.tolist() if prescale else None
        per = rows * (R + extra)
        if gram:
            st.grams = gram_out if gram_out is not None else torch.empty(len(layers), R, R, dtype=dtype,
                                                                         device=device)
        st.full, st.raw = [], []
        shape = (rows, R + extra) if side == "left" else (R + extra, rows)
        for li, inp in enumerate(layers):
            if buffer is not None:
                full = buffer[li * per:(li + 1) * per].view(shape)
            else:
                full = torch.empty(shape, dtype=dtype, device=device)
            raw = full[:, :R] if side == "left" else full[:R]
            off = 0
            for t in (inp.B if side == "left" else inp.A):
                w = t.shape[1] if side == "left" else t.shape[0]
                blk = raw[:, off:off + w] if side == "left" else raw[off:off + w]
                blk.copy_(t)
                if prescale and cvals[li][off] != 1.0:  # scale the block while still in cache
                    blk.mul_(cvals[li][off])
                off += w
            st.full.append(full)
            st.raw.append(raw)
            if gram:
                gram_into(st.tall(li), st.grams[li], symmetric_min_r)
        if prescale:  # the stacks now hold X = X_raw·diag(c): unit coefficients from here on
            st.c = torch.ones_like(coeffs)
            st.unit = True
        return st

    def subset(self, idx: list[int]) -> "Stacked":
        """The same stacks for the layers ``idx`` only (no copy of the factors)."""
        sel = torch.tensor(idx, device=self.c.device)
        pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
        return dataclasses.replace(self, layers=[self.layers[i] for i in idx], c=self.c[sel],
                                   raw=pick(self.raw), full=pick(self.full),
                                   grams=None if self.grams is None else self.grams[sel])

    def tall(self, li: int) -> torch.Tensor:
        """Layer li's stored tall stack (rows x R), a view (torch backend)."""
        return self.raw[li] if self.side == "left" else self.raw[li].T

    def _lists(self) -> list:
        return [(inp.B if self.side == "left" else inp.A) for inp in self.layers]

    def _ones(self) -> list:
        return [[1.0] * inp.K for inp in self.layers]

    def raw_gram(self) -> torch.Tensor:
        """L x R x R Grams of the stacks as stored (coefficients not applied), compute dtype."""
        if self.raw is not None:
            if self.grams is None:
                raise RuntimeError("Stacked was built with gram=False")
            return self.grams
        return K.batched_stacked_gram(self._lists(), self._ones(), self.side, self.dtype)

    def gram(self, raw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L x R x R Grams of the weighted stacks, fp64: :meth:`raw_gram` (or ``raw``, that Gram
        already formed) with the column coefficients applied."""
        G = (self.raw_gram() if raw is None else raw).to(torch.float64)
        return G if self.unit else G * self.c[:, :, None] * self.c[:, None, :]

    def tall_apply(self, mat: torch.Tensor, transposed: bool = False, coeffs: bool = True) -> list[torch.Tensor]:
        """X_l @ mat_l for every layer (mat: L x R x k) -> L tensors rows x k, compute dtype.

        ``transposed=True`` returns (X_l @ mat_l)ᵀ, k x rows: for the A side that is the layout of
        the stored R x n stack, so the product is written row-major without a transpose.
        ``coeffs=False``: ``mat`` already carries the column coefficients."""
        scaled = (mat if (self.unit or not coeffs) else mat * self.c[:, :, None]).to(self.dtype)
        if self.raw is not None:
            outs: list = [None] * scaled.shape[0]
            for li in reversed(range(scaled.shape[0])):  # last stacked = most likely still cached
                if transposed and self.side == "right":
                    outs[li] = scaled[li].T @ self.raw[li]
                else:
                    o = self.tall(li) @ scaled[li]
                    outs[li] = o.T if transposed else o
            return outs
        if self.side == "left":
            out = K.batched_stacked_matmul(self._lists(), self._ones(), "left", scaled, self.dtype)
        else:
            out = K.batched_stacked_matmul_t(self._lists(), self._ones(), "right", scaled, self.dtype)
        return list((out.transpose(1, 2) if transposed else out).unbind(0))

    def tall_apply_t(self, mat: torch.Tensor) -> list[torch.Tensor]:
        """X_lᵀ @ mat_l for every layer (mat: L x rows x k) -> L tensors R x k, compute dtype."""
        mat = mat.to(self.dtype)
        if self.raw is not None:
            outs = [(self.raw[li].T @ mat[li]) if self.side == "left" else (self.raw[li] @ mat[li])
                    for li in range(mat.shape[0])]
        elif self.side == "left":
            outs = list(K.batched_stacked_matmul_t(self._lists(), self._ones(), "left", mat,
                                                   self.dtype).unbind(0))
        else:
            outs = list(K.batched_stacked_matmul(self._lists(), self._ones(), "right", mat,
                                                 self.dtype).unbind(0))
        if self.unit:
            return outs
        return [o * self.c[li].to(self.dtype)[:, None] for li, o in enumerate(outs)]

    def tall_dense(self, li: int) -> torch.Tensor:
        """Layer li's weighted tall stack (rows x R), explicit."""
        if self.raw is not None:
            x = self.tall(li)
        else:
            inp = self.layers[li]
            x = _ref._stack(inp.B if self.side == "left" else inp.A, [1.0] * inp.K, self.side, self.dtype)
            x = x if self.side == "left" else x.T
        return x if self.unit else x * self.c[li].to(self.dtype)[None, :]

    def spare(self, li: int, k: int) -> Optional[torch.Tensor]:
        """The first ``k`` spare columns (left, m x k) / rows (right, k x n) after layer li's
        prescaled stack, or None when the stacks are not prescaled or have no such room."""
        if not (self.unit and self.full is not None):
            return None
        full = self.full[li]
        if self.side == "left":
            return full[:, self.R:self.R + k] if full.shape[1] - self.R >= k else None
        return full[self.R:self.R + k] if full.shape[0] - self.R >= k else None

    def append(self, li: int, block: torch.Tensor) -> torch.Tensor:
        """Layer li's stack (weighted) with ``block`` appended: [X_B | block] (left, block m x k) or
        [X_Aᵀ; block] (right, block k x n). Written into the spare columns/rows when there is room
        (:meth:`spare`; no second copy of the stacks), concatenated otherwise."""
        k = block.shape[1] if self.side == "left" else block.shape[0]
        room = self.spare(li, k)
        if room is not None:
            if room.data_ptr() != block.data_ptr():
                room.copy_(block)
            full = self.full[li]
            return full[:, :self.R + k] if self.side == "left" else full[:self.R + k]
        x = self.tall_dense(li)
        return torch.cat([x, block], 1) if self.side == "left" else torch.cat([x.T, block], 0)
