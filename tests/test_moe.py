"""MoE quantization: experts of both layouts quantized per expert with the statistics of the tokens routed to each,
against transformers' own forward with the dequantized weights put back into the original 3-D experts."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import any4lib
from any4lib.calibration import calibrate
from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.model import quantize_model
from any4lib.moe import ExpertLinears, unstack_experts
from any4lib.nn import QuantLinear

SMALL = dict(vocab_size=258, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, bos_token_id=0, eos_token_id=1)  # fmt: skip


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(**SMALL, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def tiny_qwen_moe(seed=0):
    torch.manual_seed(seed)
    config = Qwen2MoeConfig(**SMALL, intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
    return Qwen2MoeForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def route_to_first_two(model):
    """Force every token to experts 0 and 1 (experts 2 and 3 get nothing), through the routers' outputs."""

    def hook(module, args, out):
        router_logits, weights, index = out
        return router_logits, weights, torch.arange(index.shape[-1]).expand_as(index).clone()

    for module in model.modules():
        if type(module).__name__ == "MixtralTopKRouter":
            module.register_forward_hook(hook)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen_moe])
def test_unstacked_experts_compute_the_original_function(make):
    model = make()
    reference = copy.deepcopy(model)
    names = unstack_experts(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert isinstance(model.model.layers[1].mlp.experts, ExpertLinears)
    assert unstack_experts(model) == []  # idempotent
    # The per-expert weights are views of the 3-D parameter: nothing is copied.
    stacked = reference.model.layers[0].mlp.experts.down_proj
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[3].weight, stacked[3])
    ids = torch.randint(0, 258, (2, 24))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def routed_statistics(model, ids):
    """Per expert of each layer, |mean input| of both projections over the tokens the router sent there, computed
    from the original 3-D weights (the independent reference of what calibrate measures)."""
    weights = {}

    def capture(name):
        def hook(module, args):
            hidden, index = args[0], args[1]
            for e in range(module.num_experts):
                x = hidden[(index == e).any(-1)].double()
                if len(x) == 0:
                    continue
                gate, up = F.linear(x, module.gate_up_proj[e].double()).chunk(2, -1)
                weights[f"{name}.gate_up_proj.{e}"] = x.mean(0).abs().float()
                weights[f"{name}.down_proj.{e}"] = (F.silu(gate) * up).mean(0).abs().float()

        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in model.named_modules() if n.endswith("mlp.experts")]
    logits(model, ids)
    for handle in handles:
        handle.remove()
    return weights


def test_experts_are_quantized_per_expert_with_routed_tokens_and_unreached_ones_unweighted(tiny, caplog):
    _, tokenizer = tiny
    model = tiny_mixtral()
    route_to_first_two(model)
    reference = copy.deepcopy(model)
    ids = tokenizer(any4lib.paths.calibration_prompt(), return_tensors="pt").input_ids
    expected = routed_statistics(reference, ids)
    assert len(expected) == 2 * 2 * 2  # experts 0 and 1 of each layer, both projections

    stats = calibrate(model, tokenizer, progress=False)
    for name, weight in expected.items():
        torch.testing.assert_close(stats.sample_weight(name), weight, rtol=1e-5, atol=1e-7)
    with caplog.at_level(logging.WARNING, logger="any4lib.moe"):
        quantize_model(model, "any4", 64, calibration=stats, progress=False)
    unreached = [f"model.layers.{i}.mlp.experts.{p}.{e}" for i in range(2) for p in ("gate_up_proj", "down_proj")
                 for e in (2, 3)]  # fmt: skip
    moe_warnings = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "any4lib.moe"]
    assert sorted(moe_warnings) == sorted(unreached)

    layers = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {f"model.layers.0.mlp.experts.down_proj.{e}" for e in range(4)} <= layers
    assert len(layers) == 2 * (4 + 2 * 4)  # q, k, v, o and both projections of 4 experts, per layer
    assert not any(".gate." in n or n.endswith(".gate") for n in layers)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, reference.model.layers[0].mlp.gate.weight)

    # Independent path: quantize each expert's slice of the original 3-D weights with its routed statistics (none for
    # unreached experts), put the dequantized slices back, and run transformers' own forward.
    for i, layer in enumerate(reference.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            param = getattr(layer.mlp.experts, proj)
            for e in range(4):
                weight = expected.get(f"model.layers.{i}.mlp.experts.{proj}.{e}")
                param.data[e] = any4lib.quantize(param[e], "any4", 64, sample_weight=weight).dequantize()
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(layer.self_attn, proj)
            name = f"model.layers.{i}.self_attn.{proj}"
            linear.weight.data = any4lib.quantize(linear.weight, "any4", 64, sample_weight=stats.sample_weight(name)).dequantize()
    probe = torch.randint(0, 258, (2, 30))
    torch.testing.assert_close(logits(model, probe), logits(reference, probe), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [tiny_mixtral, tiny_qwen_moe])
def test_save_load_round_trip_gives_the_same_logits(tiny, tmp_path, make):
    _, tokenizer = tiny
    model = make()
    quantize_model(model, "any4", 64, calibration=calibrate(model, tokenizer, progress=False), progress=False)
    save_quantized(model, tmp_path / "q", tokenizer)
    back = load_quantized(tmp_path / "q")
    experts = back.model.layers[1].mlp.experts
    assert isinstance(experts, ExpertLinears) and isinstance(experts.down_proj[2], QuantLinear)
    assert torch.equal(experts.down_proj[2].codes, model.model.layers[1].mlp.experts.down_proj[2].codes)
    if make is tiny_qwen_moe:  # the shared expert is an ordinary MLP, its sigmoid gate a router
        assert isinstance(back.model.layers[0].mlp.shared_expert.up_proj, QuantLinear)
        assert type(back.model.layers[0].mlp.shared_expert_gate) is nn.Linear
    ids = torch.randint(0, 258, (2, 19))
    assert torch.equal(logits(back, ids), logits(model, ids))


class LegacyMoe(nn.Module):
    """transformers 4.x's sparse MoE block: an nn.Linear router and an nn.ModuleList of per-expert MLPs."""

    def __init__(self, config, experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(config.hidden_size, experts, bias=False)
        self.experts = nn.ModuleList(LlamaMLP(config) for _ in range(experts))

    def routing(self, x):
        weights, index = torch.topk(F.softmax(self.gate(x), -1, dtype=torch.float), self.top_k, -1)
        return weights / weights.sum(-1, keepdim=True), index

    def forward(self, hidden):
        x = hidden.reshape(-1, hidden.shape[-1])
        weights, index = self.routing(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if len(token):
                out.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(x.dtype))
        return out.view_as(hidden)


def test_expert_linear_lists_are_calibrated_on_their_routed_tokens_and_the_router_kept(tiny):
    _, tokenizer = tiny
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, intermediate_size=256)).eval()
    for layer in model.model.layers:
        layer.mlp = LegacyMoe(model.config)
    captured = {}
    model.model.layers[1].mlp.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    stats = calibrate(model, tokenizer, progress=False)

    block = model.model.layers[1].mlp
    x = captured["x"].reshape(-1, 128)
    _, index = block.routing(x)
    for e in range(4):
        routed = x[(index == e).any(-1)]
        name = f"model.layers.1.mlp.experts.{e}.up_proj"
        assert stats.tokens[name] == len(routed)
        torch.testing.assert_close(stats.sample_weight(name), routed.double().mean(0).abs().float())
    quantize_model(model, "int4", 64, calibration=stats, progress=False)
    assert type(model.model.layers[0].mlp.gate) is nn.Linear  # the router stays unquantized by default
    assert isinstance(model.model.layers[0].mlp.experts[3].down_proj, QuantLinear)
