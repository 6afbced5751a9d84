"""any4 in transformers' quantizer registry.

    import any4lib
    model = AutoModelForCausalLM.from_pretrained(folder)        # a save_quantized folder: QuantLinear layers
    model = AutoModelForCausalLM.from_pretrained(model_id, quantization_config=any4lib.Any4Config("any4", 128))
    model.save_pretrained(out)                                   # a folder both loaders read

A pre-quantized folder's linear layers become QuantLinear layers before transformers assigns the stored tensors
(their shapes read from the safetensors headers), so device_map / max_memory place them like any module's; on a
GPU they are packed for the tinygemm kernels once loaded. Quantizing on load calibrates on the paper's prompt (or
`calibration=`) once the dense weights are in, then quantizes with any4lib.quantize_model.

`import any4lib` registers this module when transformers loads its registry (any4lib.transformers_hook), so the
package import stays cheap.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import (
    LEGACY_CONFIG, QUANT_METHOD, VERSION, convert_hint, describe_quantization, header_tensors, read_quant_config,
    replace_linears, unshared_state, verify_checksums,
)  # fmt: skip
from .checks import check_finite
from .formats import get_format
from .model import DEFAULT_EXCLUDE, quantize_model, quantized_layers

log = logging.getLogger("any4lib")


@register_quantization_config(QUANT_METHOD)
class Any4Config(QuantizationConfigMixin):
    """transformers' quantization_config of an any4lib model (the fields: any4lib.checkpoint's module doc).

    As a request to from_pretrained: format (any any4lib format name), group_size (None: one group per row),
    method ("rtn", or steps joined by "+": "gptq", "awq", "smoothquant", "rotate", "omniquant"), activations (an
    activation format of any4lib.activations, e.g. "int8"; None: weights only), calibration ("prompt" (None: the default), "none", "<set>:<N>", as
    `any4 quantize`),
    modules_to_not_convert (glob / regex patterns; lm_head and MoE routers by default).
    """

    def __init__(self, format: str = "any4", group_size: int | None = 128, method: str = "rtn",
                 calibration: str | None = None, activations: str | None = None,
                 modules_to_not_convert: list[str] | None = None, bits: int | None = None,
                 layers: dict | None = None, checksums: dict | None = None, version: int = VERSION,
                 quant_method: str = QUANT_METHOD, **unknown):
        from .experiments import parse_calibration
        from .pipeline import parse_method

        if unknown:
            raise ValueError(f"Any4Config: unknown fields {sorted(unknown)} (written by a newer any4lib?)")
        from .activations import resolve_activations

        self.quant_method = QUANT_METHOD
        self.format = get_format(format).name
        self.bits = get_format(format).bits if bits is None else bits
        self.group_size = group_size
        self.method = parse_method(method)
        parse_calibration(calibration or "prompt")  # a bad spec fails here, not after the weights loaded
        self.calibration = calibration
        self.activations = resolve_activations(activations)
        self.modules_to_not_convert = list(DEFAULT_EXCLUDE if modules_to_not_convert is None else modules_to_not_convert)
        self.layers = layers or {}
        self.checksums = checksums
        self.version = version


@register_quantizer(QUANT_METHOD)
class Any4HfQuantizer(HfQuantizer):
    """Loads save_quantized folders into QuantLinear layers, or quantizes a dense model on load (see module doc)."""

    requires_calibration = False
    quantization_config: Any4Config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model  # the dense weights load first; _process_model_after_weight_loading quantizes them
        if not checkpoint_files:
            raise ValueError("an any4 model loads from safetensors files (from_pretrained got no checkpoint files)")
        if self.quantization_config.checksums:
            folder = Path(checkpoint_files[0]).parent
            verify_checksums(folder, self.quantization_config.checksums)
        replace_linears(model, self.quantization_config.to_dict(), header_tensors(checkpoint_files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            layers = quantized_layers(model)
            for layer in layers.values():
                layer.buffers_changed()
            resident = {n: t for n, t in [*model.named_buffers(), *model.named_parameters()] if not t.is_meta}
            check_finite(resident, model.config.name_or_path)  # (meta: offloaded to disk by the device map)
        else:
            self._quantize(model)
            layers = quantized_layers(model)
        on_gpu = [layer for layer in layers.values() if next(layer.buffers()).is_cuda]
        if on_gpu and model.dtype in (torch.bfloat16, torch.float16):
            for layer in on_gpu:
                layer.pack(model.dtype)  # False (kept in contract form) where the kernels do not run the format
        return model

    def _quantize(self, model: nn.Module) -> None:
        from .experiments import calibration_stats, method_calibration

        request = self.quantization_config
        calibration = method_calibration(request.calibration or "prompt", request.method)
        tokenizer = None
        if calibration.partition("@")[0] != "none":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
        stats = calibration_stats(model, tokenizer, calibration)
        quantize_model(model, request.format, request.group_size, stats, exclude=request.modules_to_not_convert,
                       method=request.method, activations=request.activations, progress=False)
        self._describe(model)

    def _describe(self, model: nn.Module) -> None:
        """The config (the same object as model.config.quantization_config) now says what the model holds."""
        for key, value in describe_quantization(model).items():
            setattr(self.quantization_config, key, value)
        self.quantization_config.checksums = None  # those of files this model is not written to

    def get_state_dict_and_metadata(self, model):
        # save_pretrained writes the config before the weights, so that folder records no checksums.
        self._describe(model)
        return unshared_state(model), {}

    def is_serializable(self, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class _EarlierCheckpointNote(logging.Filter):
    """Adds how to convert to transformers' load report of an any4lib folder of versions 1-3 (quant.json), which
    carries no quantization_config and so loads as an unquantized model with unexpected keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        found = re.search(r"LOAD REPORT\S* from: ([^\n]+)", message)
        if found and (Path(found.group(1)) / LEGACY_CONFIG).is_file():
            quant = read_quant_config(found.group(1))
            if quant is not None and quant.get("quant_method") != QUANT_METHOD:
                record.msg, record.args = f"{message}\n{convert_hint(found.group(1))}", ()
        return True


logging.getLogger("transformers.modeling_utils").addFilter(_EarlierCheckpointNote())
