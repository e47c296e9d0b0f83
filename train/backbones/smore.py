"""SMORE (Ong & Khong, "Spectrum-based Modality Representation Fusion Graph Convolutional Network
for Multimodal Recommendation", WSDM 2025) as MMRec's `models/smore.py` computes it.

MGCN's skeleton (`ModalGraphBackbone`) with:
- spectrum convolution: F_m = rfft(trs_m(f_m), norm="ortho") (d → d/2+1 complex bins);
  conv_m = irfft(F_m ⊙ w_m), fusion = irfft(F_v ⊙ F_t ⊙ w_f) with learnable complex weights;
- item-level gating x̃_m = item_id ⊙ σ(gate_m(conv_m)) for m ∈ {image, text, fusion}, propagated
  on the image kNN graph, the text kNN graph and the fusion graph (elementwise max of the two);
- modality-aware preference: agg_m = softmax_d(query_m(e_fusion)) ⊙ e_m, gated by
  dropout(σ(W_m content)); side = mean(agg_v, agg_t, gated fusion); final = content + side.
Loss as MGCN. Defaults are SMORE's Baby row (n_ui_layers 4, k 40/15, dropout 0.1, reg 1e-4);
MMRec trains SMORE with the LR schedule [0.96, 50]: set `optim.lr_scheduler` accordingly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from train.backbones.base import BackboneInputs
from train.backbones.mgcn import ModalGraphBackbone, gate
from train.knn import max_fuse


class SMOREConfig(BaseModel):
    """SMORE's published best settings for Amazon Baby."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["smore"] = "smore"
    embedding_size: int = 64
    n_ui_layers: int = 4
    n_layers: int = 1
    image_knn_k: int = 40
    text_knn_k: int = 15
    reg_weight: float = 1e-4
    cl_loss: float = 0.01
    dropout_rate: float = 0.1
    graph_cache: Path | None = None


def query(d: int) -> nn.Sequential:
    """Linear-Tanh-Linear attention query over the feature dimension."""
    return nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d, bias=False))


def _irfft(z: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse real FFT back to d features (orthonormal scaling)."""
    return torch.fft.irfft(z, n=d, dim=1, norm="ortho")


class SMORE(ModalGraphBackbone):
    """Spectral modality fusion with a fusion item-item view."""

    def __init__(self, cfg: SMOREConfig, inputs: BackboneInputs):
        super().__init__(cfg, inputs)
        d = cfg.embedding_size
        image_adj = self.modal_knn("image", cfg.image_knn_k)
        text_adj = self.modal_knn("text", cfg.text_knn_k)
        self.add_item_graph("image", image_adj)
        self.add_item_graph("text", text_adj)
        self.add_item_graph("fusion", max_fuse(image_adj, text_adj))
        bins = d // 2 + 1
        self.complex_weight = nn.ParameterDict({v: nn.Parameter(torch.randn(1, bins, 2))
                                                for v in ("image", "text", "fusion")})
        self.gate_v, self.gate_t, self.gate_f = gate(d), gate(d), gate(d)
        self.query_v, self.query_t = query(d), query(d)
        self.gate_image_prefer, self.gate_text_prefer = gate(d), gate(d)
        self.gate_fusion_prefer = gate(d)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def spectrum(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Uni-modal denoising and cross-modal fusion in the frequency domain: (I, d) each."""
        d = image.shape[1]
        w = {v: torch.view_as_complex(p) for v, p in self.complex_weight.items()}   # (1, bins)
        f_v = torch.fft.rfft(image, dim=1, norm="ortho")                               # (I, bins)
        f_t = torch.fft.rfft(text, dim=1, norm="ortho")
        return {"image": _irfft(f_v * w["image"], d), "text": _irfft(f_t * w["text"], d),
                "fusion": _irfft(f_t * f_v * w["fusion"], d)}

    def item_view_inputs(self) -> dict[str, torch.Tensor]:
        proj = self.projected()
        conv = self.spectrum(proj["image"], proj["text"])
        item = self.item_id_embedding.weight
        return {"image": item * self.gate_v(conv["image"]),
                "text": item * self.gate_t(conv["text"]),
                "fusion": item * self.gate_f(conv["fusion"])}

    def fuse(self, content: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
        e_v, e_t, e_f = views["image"], views["text"], views["fusion"]         # (n, d)
        agg_v = self.query_v(e_f).softmax(-1) * e_v
        agg_t = self.query_t(e_f).softmax(-1) * e_t
        agg_v = self.dropout(self.gate_image_prefer(content)) * agg_v
        agg_t = self.dropout(self.gate_text_prefer(content)) * agg_t
        agg_f = self.dropout(self.gate_fusion_prefer(content)) * e_f
        return (agg_v + agg_t + agg_f) / 3
