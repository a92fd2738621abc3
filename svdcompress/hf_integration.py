"""transformers' quantizer plug-in: ``AutoModelForCausalLM.from_pretrained(DIR)`` reads our folders.

``import svdcompress`` registers :class:`SvdCompressQuantizer` for ``quant_method: svdcompress``
(the ``quantization_config`` every saved checkpoint carries, :mod:`svdcompress.checkpoint`). During
``from_pretrained`` it swaps in the checkpoint's ``LowRankLinear`` modules (and splits fused
projections) on the meta device, checks every factor's shape and dtype in the safetensors headers,
then lets transformers load the tensors as for any model. After that the model is an ordinary
transformers model: ``save_pretrained`` (and so Trainer checkpoints) writes the same format,
``dequantize()`` gives the dense model, and the Trainer fine-tunes float factors directly.
``push_to_hub`` uploads what :func:`svdcompress.save` writes, our model card and recipe included
(:func:`svdcompress.checkpoint.push_to_hub`), instead of transformers' generic card.

Without ``import svdcompress`` transformers does not know the method, skips it with a warning, and
then refuses the guard tensors (:func:`svdcompress.checkpoint.guard_names`) with a size-mismatch
error; only float dense-storage layers are plain weights, which it loads correctly (those that
replaced a ``Conv1D`` are stored in its orientation: :func:`svdcompress.checkpoint.conv1d_weights`).
"""

from __future__ import annotations

import re
import types
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from svdcompress.checkpoint import (
    QUANT_METHOD,
    SvdCompressQuantizationConfig,
    check_tensors,
    conv1d_weights,
    densify_,
    guard_names,
    install_empty_modules_,
    push_to_hub,
    state_to_save,
    tensor_headers,
    transpose_conv1d_weights,
)

__all__ = ["SvdCompressQuantizer", "attach_quantizer", "register"]

_STAND_IN = "weight"  # the attribute _init_weights may touch on a layer it believes is nn.Linear


class SvdCompressQuantizer(HfQuantizer):
    """Loads svdcompress checkpoints in ``from_pretrained``; it never compresses a model itself."""

    # Factors come from compress_ (calibration, allocation): passing our config to from_pretrained
    # for a plain model is refused by transformers (pre_quantized=False with calibration required).
    requires_calibration = True
    quantization_config: SvdCompressQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any):
        layout = self.quantization_config
        install_empty_modules_(model, layout)
        if checkpoint_files:  # a factor that is missing or misshapen: our message, before any load
            check_tensors(layout, transpose_conv1d_weights(layout, tensor_headers(checkpoint_files)))
        # Conv1D-layout dense weights arrive as the file holds them, (in, out): an empty parameter of
        # that shape receives them, turned back to the module's (out, in) after loading.
        for name in conv1d_weights(layout):
            module = model.get_submodule(name.rpartition(".")[0])
            module.weight = torch.nn.Parameter(torch.empty(module.weight.shape[::-1], device="meta"))
        # The guard tensors are there for stock transformers only (guard_names); here they are noise.
        ignored = {f"^{re.escape(name)}$" for name in guard_names(layout)}
        model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()), *ignored}
        # After loading, transformers runs each family's _init_weights on every module (it also builds
        # non-persistent buffers such as causal masks), and some reach into a child's .weight (GPT-2
        # rescales c_proj.weight), which a factored module lacks: an empty stand-in, removed after.
        for name in guard_names(layout):
            model.get_submodule(name.rpartition(".")[0]).register_buffer(
                _STAND_IN, torch.empty(0), persistent=False)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        for name in guard_names(self.quantization_config):
            delattr(model.get_submodule(name.rpartition(".")[0]), _STAND_IN)
        for name in conv1d_weights(self.quantization_config):
            module = model.get_submodule(name.rpartition(".")[0])
            module.weight = torch.nn.Parameter(module.weight.detach().T.contiguous(),
                                               requires_grad=module.weight.requires_grad)
        model.add_model_tags(["svdcompress", "low-rank"])
        _upload_our_folder(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """``save_pretrained``/``push_to_hub``: the live layout and the guards go along."""
        layout = SvdCompressQuantizationConfig.from_model(model)
        if layout is not None:
            self.quantization_config = model.config.quantization_config = layout
        return state_to_save(model), {}

    def _dequantize(self, model, dtype=None):
        return densify_(model)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Float factors are ordinary parameters; int8 codes are buffers that gradients cannot move."""
        return self.quantization_config.float_factors

    @property
    def is_qat_trainable(self) -> bool:
        # transformers' Trainer asks this to allow full fine-tuning without adapters.
        return self.quantization_config.float_factors


def attach_quantizer(model) -> None:
    """Give a model compressed (or loaded) by svdcompress the quantizer ``from_pretrained`` would:
    its own ``save_pretrained`` — and so ``push_to_hub`` and Trainer checkpoints — then writes the
    format ``from_pretrained`` reads (quantization_config, guard tensors), never a folder that stock
    transformers would fill with random weights. ``is_quantized`` stays unset: the Trainer treats the
    model as any other."""
    layout = SvdCompressQuantizationConfig.from_model(model)
    if layout is not None and hasattr(model, "save_pretrained"):
        model.hf_quantizer = SvdCompressQuantizer(layout, pre_quantized=True)
        _upload_our_folder(model)


def _upload_our_folder(model) -> None:
    """``model.push_to_hub`` uploads our folder (card, recipe): transformers' own would replace
    the card by its generic one after ``save_pretrained`` (see checkpoint.push_to_hub)."""
    model.push_to_hub = types.MethodType(push_to_hub, model)


def register() -> None:
    """Make transformers' Auto classes know ``quant_method: svdcompress`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SvdCompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SvdCompressQuantizer)
