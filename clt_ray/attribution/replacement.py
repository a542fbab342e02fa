"""circuit-tracer's replacement model of an LM with an exported CLT in place of its MLPs: the
backend choice, circuit-tracer's CLT with the reconstruction fix, tokenising with length checks."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch

from clt_ray.attribution.folder import (
    BACKENDS,
    AttributionError,
    Backend,
    CLTFolder,
    check_fits,
    feature_scan,
    read_clt_folder,
)
from clt_ray.lm import model_config


def pick_backend(hf_config: Any, backend: str, input_hook: str) -> str:
    """nnsight where circuit-tracer registers the architecture and the hook, else TL."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping, get_supported_architectures

    if backend not in BACKENDS:
        raise AttributionError(f"unknown backend {backend!r} (supported: {', '.join(BACKENDS)})")
    arch = (getattr(hf_config, "architectures", None) or [""])[0]
    registered = arch in get_supported_architectures() and \
        input_hook in get_mapping(arch).feature_hook_mapping
    if backend == "nnsight" and not registered:
        raise AttributionError(f"circuit-tracer's nnsight backend has no mapping for {arch} with "
                               f"hook {input_hook}; use backend transformerlens")
    if backend == "auto":
        return "nnsight" if registered else "transformerlens"
    return backend


@functools.cache
def _position_safe_clt_class() -> type:
    """circuit-tracer's CrossLayerTranscoder with its reconstruction sized by the prompt.

    circuit-tracer 0.5 sizes the reconstruction by the last position where some feature fires
    (`n_pos = pos_ids.max() + 1`), so a prompt whose last tokens activate no feature in any layer
    gets a reconstruction shorter than the MLP outputs it is subtracted from, and
    `setup_attribution` fails ("size of tensor a (42) must match … b (41)"). Early in training,
    with few features, that is common. With no feature active at all it fails on an empty
    `torch.cat`. This subclass takes the length from the activations and handles the empty case;
    it adds no state, so a loaded instance can take it as its class."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    class PositionSafeCLT(CrossLayerTranscoder):
        def select_decoder_vectors(self, features):
            if features.is_sparse and features._nnz() == 0:
                long = torch.zeros(0, dtype=torch.long, device=features.device)
                empty = torch.zeros(0, self.d_model, dtype=self.dtype, device=features.device)
                return long, long, long, empty, long
            return super().select_decoder_vectors(features)

        def compute_reconstruction(self, pos_ids, layer_ids, decoder_vectors, input_acts=None,
                                   n_pos: int | None = None):
            if n_pos is None:
                n_pos = input_acts.shape[-2] if input_acts is not None else int(pos_ids.max()) + 1
            recon = torch.zeros(n_pos * self.n_layers, self.d_model, device=self.b_dec.device,
                                dtype=self.b_dec.dtype)
            recon.index_add_(0, layer_ids * n_pos + pos_ids, decoder_vectors.to(recon.dtype))
            recon = recon.reshape(self.n_layers, n_pos, self.d_model) + self.b_dec[:, None]
            if self.W_skip is not None:
                recon = recon + input_acts @ self.W_skip
            return recon

        def decode(self, features, input_acts=None):
            pos_ids, layer_ids, _, vectors, _ = self.select_decoder_vectors(features)
            return self.compute_reconstruction(pos_ids, layer_ids, vectors, input_acts,
                                               n_pos=features.shape[1])

    return PositionSafeCLT


def check_model(clt: CLTFolder, model: str | None = None, backend: Backend = "auto") -> str:
    """Everything about the model that can be known without its weights: it is available (a
    hub name offline must be cached), the CLT fits it, a backend maps it. Returns its name."""
    name = model or clt.model_name
    if not name:
        raise AttributionError(f"{clt.path}/config.yaml names no model; pass one")
    _, hf_config = model_config(name)
    check_fits(clt, hf_config, name)
    pick_backend(hf_config, backend, clt.input_hook)
    return name


def load_replacement_model(
    clt: str | os.PathLike[str] | CLTFolder,
    model: str | None = None,
    *,
    backend: Backend = "auto",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hf_model: Any = None,
    tokenizer: Any = None,
) -> Any:
    """circuit-tracer's replacement model of `model` (default: the CLT's config.yaml model_name;
    a hub name, a local folder or `toy:<arch>`) with the CLT's features in place of its MLPs.

    hf_model/tokenizer: an already loaded HF model to build the TL model from (no second load)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    folder = clt if isinstance(clt, CLTFolder) else read_clt_folder(clt)
    name = model or folder.model_name
    if not name:
        raise AttributionError(f"{folder.path}/config.yaml names no model; pass one")
    if hf_model is not None:
        path, hf_config = name, hf_model.config
    else:
        path, hf_config = model_config(name)
    check_fits(folder, hf_config, name)
    backend = pick_backend(hf_config, backend, folder.input_hook)
    transcoder = load_clt(str(folder.path), device=torch.device(device), dtype=dtype,
                          lazy_encoder=False, lazy_decoder=False)
    transcoder.__class__ = _position_safe_clt_class()
    transcoder.scan = feature_scan(folder)  # graphs then name our offline dashboards
    if backend == "nnsight":
        from circuit_tracer.replacement_model.replacement_model_nnsight import (
            NNSightReplacementModel,
        )

        return NNSightReplacementModel.from_pretrained_and_transcoders(
            path, transcoder, device=torch.device(device), dtype=dtype)
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    from clt_ray.lm.tl import load_hooked_transformer

    rm = load_hooked_transformer(path, dtype=dtype, device=device, hf_model=hf_model,
                                 tokenizer=tokenizer, cls=TransformerLensReplacementModel)
    rm._configure_replacement_model(transcoder)  # what from_pretrained_and_transcoders does
    return rm


def context_limit(rm: Any) -> int | None:
    """The longest input the replacement model takes (TL's n_ctx; the HF config's positions)."""
    if getattr(rm, "backend", None) == "transformerlens":
        return int(rm.cfg.n_ctx)
    hf = getattr(rm, "_hf_config", None)
    return getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)


def tokenize(rm: Any, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Token ids [T] as circuit-tracer sees them (a special token prepended), length-checked."""
    ids = rm.ensure_tokenized(prompt if isinstance(prompt, (str, torch.Tensor)) else list(prompt))
    limit = context_limit(rm)
    if limit is not None and len(ids) > limit:
        shown = prompt if isinstance(prompt, str) else f"{len(ids)} token ids"
        raise AttributionError(f"prompt is {len(ids)} tokens, longer than the model's context of "
                               f"{limit}: {str(shown)[:80]!r}")
    if len(ids) < 2:
        raise AttributionError(f"prompt {prompt!r} is empty")
    return ids


def token_strings(rm: Any, ids: Sequence[int]) -> list[str]:
    return [rm.tokenizer.decode([int(i)]) for i in ids]
