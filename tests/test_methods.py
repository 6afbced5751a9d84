"""GPTQ and AWQ (any4lib.gptq, .awq, .pipeline) against a float64 transcription of the published algorithm, and
the properties each method promises: GPTQ never does worse than RTN on its own objective, AWQ at alpha = 0 is RTN
bit for bit, folded scales leave the float model unchanged, and every method x format saves and reloads."""

from __future__ import annotations

import copy

import pytest
import torch

from any4lib.awq import awq_scale, fold_scales, foldable_sets
from any4lib.calibration import calibrate
from any4lib.gptq import HessianAccumulator, gptq_quantize
from any4lib.checkpoint import load_quantized, save_quantized
from any4lib.model import quantize_model
from any4lib.nn import QuantLinear, use_kernels
from any4lib.pipeline import parse_method
from any4lib.quant import quantize


def correlated_inputs(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and of uneven size, as a transformer's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5 + torch.eye(k, dtype=torch.float64)
    return (torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix) * torch.linspace(0.2, 3, k).double()


def objective(w: torch.Tensor, q, x: torch.Tensor) -> float:
    """||W X - W_q X||^2 over the calibration inputs."""
    return float(((x @ (w.double() - q.dequantize(torch.float64)).T) ** 2).sum())


def reference_gptq_int4(w: torch.Tensor, h: torch.Tensor, group: int, block: int = 128, damp: float = 0.01):
    """Frantar et al. 2022, Algorithm 1 with lazy batch updates (the authors' fasterquant), in float64, with the
    suite's INT4 grid: per group of the updated weights, scale = (max - min) / 15 and zero = min + 8 * scale stored
    in float32, code = round((w - zero) / scale) + 8 clamped to [0, 15]."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.long)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                values = w1[:, i : i + group].float()
                lo, hi = values.amin(1), values.amax(1)
                scale = (hi - lo) / 15
                zero = (lo + 8 * scale).double()
                scale = scale.double()
            code = (torch.round((w1[:, i] - zero) / scale) + 8).clamp(0, 15)
            q = (code - 8) * scale + zero
            codes[:, i1 + i] = code.long()
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


@pytest.mark.parametrize("k, group", [(256, 64), (384, 128), (192, 32)])
def test_gptq_equals_the_published_algorithm_in_float64(k, group):
    torch.manual_seed(k)
    w = torch.randn(48, k, dtype=torch.float64)
    acc = HessianAccumulator(k)
    acc.add(correlated_inputs(k))
    ours = gptq_quantize(w, acc.hessian(), "int4", group)
    expected = reference_gptq_int4(w, acc.hessian(), group)
    assert torch.equal(ours.codes.long(), expected)
    rtn = quantize(w, "int4", group)
    assert not torch.equal(ours.codes, rtn.codes)  # error feedback did move codes


ALL_KINDS = ["int4", "int4_sym", "nf4", "fp4", "any4", "int3", "any3", "int2", "any2", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("fmt", ALL_KINDS)
@pytest.mark.parametrize("variant", [{}, {"act_order": True}, {"static_groups": True}])
def test_gptq_never_does_worse_than_rtn_on_its_calibration_inputs(fmt, variant):
    k = 256
    x = correlated_inputs(k, seed=1)
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(2))
    sample_weight = x.abs().mean(0).float()
    acc = HessianAccumulator(k)
    acc.add(x)
    rtn = quantize(w, fmt, 64, sample_weight=sample_weight)
    ours = gptq_quantize(w, acc.hessian(), fmt, 64, sample_weight, **variant)
    assert ours.format == rtn.format and ours.group_size == rtn.group_size
    assert objective(w, ours, x) < objective(w, rtn, x)
    if get_learned(fmt):  # the LUT and group scales are the RTN ones: GPTQ only re-assigns codes
        assert torch.equal(ours.lut, rtn.lut) and torch.equal(ours.scale, rtn.scale)


def get_learned(fmt: str) -> bool:
    from any4lib.formats import get_format

    return get_format(fmt).learned


def test_gptq_with_a_diagonal_hessian_is_rtn():
    """No correlation between features: nothing to feed the error to, so GPTQ rounds to nearest."""
    w = torch.randn(32, 128, dtype=torch.float64)
    h = torch.diag(torch.rand(128, dtype=torch.float64) + 0.5)
    for fmt in ("int4", "nf4", "any4"):
        assert torch.equal(gptq_quantize(w, h, fmt, 64).codes, quantize(w, fmt, 64).codes), fmt


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="K=64"):
        gptq_quantize(torch.randn(8, 64), torch.eye(32), "int4", 32)


def online(model, tokenizer):
    return calibrate(model, tokenizer, mode="online", progress=False)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "any4"])
def test_awq_at_alpha_zero_is_rtn_bit_for_bit(tiny, fmt):
    model, tokenizer = tiny
    stats = online(model, tokenizer)
    rtn = quantize_model(copy.deepcopy(model), fmt, 64, stats, progress=False)
    awq = quantize_model(copy.deepcopy(model), fmt, 64, stats, method="awq", method_options={"awq_grid": 1},
                         progress=False)
    for (name, a), (_, b) in zip(rtn.named_modules(), awq.named_modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), name
            assert torch.equal(a.lut, b.lut), name
    assert torch.equal(rtn.model.norm.weight, awq.model.norm.weight)
    assert torch.equal(rtn.model.layers[1].input_layernorm.weight, awq.model.layers[1].input_layernorm.weight)


def full_attention_model():
    """A tiny Llama without grouped-query attention, so that v -> o folds too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).double().eval()


def test_folded_scales_leave_the_float_model_unchanged():
    model = full_attention_model()
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    sets = foldable_sets(block, names)
    assert [p for p, _ in sets] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    for producer, consumers in sets:
        width = block.get_submodule(consumers[0]).in_features
        fold_scales(block, producer, consumers, awq_scale(torch.rand(width, dtype=torch.float64) * 5, 0.7))
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(block.input_layernorm.weight, model.model.layers[1].input_layernorm.weight)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_grouped_query_attention_does_not_fold_v_into_o(tiny):
    model, _ = tiny
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "self_attn.v_proj" not in [p for p, _ in foldable_sets(block, names)]


def test_awq_scales_fold_and_lower_the_block_error(tiny):
    """AWQ picks alpha on the block's output error with the format in the loop: never worse than alpha = 0."""
    from any4lib.awq import awq_block
    from any4lib.pipeline import capture_block_inputs, run_block

    model, tokenizer = tiny
    stats = online(model, tokenizer)
    inputs = capture_block_inputs(model, stats.inputs)
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    reference = [run_block(block, item) for item in inputs]

    @torch.no_grad()
    def rtn_error(b):
        b = copy.deepcopy(b)
        for name in names:
            linear = b.get_submodule(name)
            linear.weight.data = quantize(linear.weight, "int3", 64).dequantize()
        return sum(float((run_block(b, i) - r).pow(2).sum()) for i, r in zip(inputs, reference))

    plain = rtn_error(block)
    chosen = awq_block(block, names, inputs, "int3", 64, grid=10)
    assert set(chosen) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    torch.testing.assert_close(run_block(block, inputs[0]), reference[0], rtol=1e-4, atol=1e-5)  # folding is exact
    assert rtn_error(block) <= plain


@pytest.mark.parametrize("fmt, method", [("any4", "gptq"), ("int4", "awq+gptq"), ("nvfp4", "gptq"), ("any3", "awq")])
def test_method_and_format_save_and_reload(tiny, tmp_path, fmt, method):
    model, tokenizer = tiny
    quantize_model(model, fmt, 64, online(model, tokenizer), method=method, progress=False)
    save_quantized(model, tmp_path / "q", tokenizer)
    back = load_quantized(tmp_path / "q")
    ids = torch.randint(0, 258, (2, 17))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.model.layers[0].mlp.down_proj.format == fmt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_a_method_on_the_gpu_does_as_well_as_on_the_cpu_and_reloads_through_the_kernels(tiny, tmp_path, method):
    model, tokenizer = tiny
    on_cpu = quantize_model(copy.deepcopy(model), "any4", 64, online(model, tokenizer), method=method, progress=False)
    on_gpu = copy.deepcopy(model).cuda()
    quantize_model(on_gpu, "any4", 64, online(on_gpu, tokenizer), method=method, progress=False)
    ids = torch.randint(0, 258, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
        errors = [float((net(ids.to(device)).logits.cpu() - reference).pow(2).mean())
                  for net, device in ((on_cpu, "cpu"), (on_gpu, "cuda"))]  # fmt: skip
    assert errors[1] < 1.1 * errors[0]  # other reduction orders may flip a few codes, never the quality
    save_quantized(on_gpu, tmp_path / "q", tokenizer)
    back = load_quantized(tmp_path / "q", "cuda").to(torch.bfloat16)
    assert back.model.layers[0].mlp.down_proj.method == method
    with torch.no_grad():
        through_kernels = back(ids.cuda()).logits.double()  # 12 rows a GEMM: tinygemm
        use_kernels(back, False)
        dequantized = back(ids.cuda()).logits.double()
    assert ((through_kernels - dequantized).norm() / dequantized.norm()).item() < 2e-2


def test_gptq_beats_rtn_on_the_model_output(tiny):
    model, tokenizer = tiny
    stats = online(model, tokenizer)
    ids = stats.inputs[0]
    with torch.no_grad():
        reference = model(ids).logits
        errors = {
            m: float((quantize_model(copy.deepcopy(model), "int3", 64, stats, method=m, progress=False)(ids).logits
                      - reference).pow(2).mean())
            for m in ("rtn", "gptq")
        }
    assert errors["gptq"] < errors["rtn"]


def test_propagating_float_outputs_differs_from_quantized(tiny):
    model, tokenizer = tiny
    stats = online(model, tokenizer)
    a = quantize_model(copy.deepcopy(model), "int3", 64, stats, method="gptq", progress=False)
    b = quantize_model(copy.deepcopy(model), "int3", 64, stats, method="gptq", progress=False,
                       method_options={"propagate": "float"})
    assert torch.equal(a.model.layers[0].self_attn.q_proj.codes, b.model.layers[0].self_attn.q_proj.codes)
    assert not torch.equal(a.model.layers[1].self_attn.q_proj.codes, b.model.layers[1].self_attn.q_proj.codes)


def test_method_names_and_errors(tiny):
    assert parse_method("awq+gptq") == parse_method(["gptq", "awq"]) == "awq+gptq"
    assert parse_method("RTN") == "rtn"
    with pytest.raises(ValueError, match="unknown method 'sparsegpt'"):
        parse_method("sparsegpt")
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="needs the calibration token windows"):
        quantize_model(model, "int4", 64, calibrate(model, tokenizer, progress=False), method="gptq", progress=False)
    with pytest.raises(ValueError, match="unknown method options"):
        quantize_model(model, "int4", 64, online(model, tokenizer), method="gptq", method_options={"dampen": 0.1})


@pytest.mark.parametrize("init", ["random", "int", "nf4"])
def test_kmeans_inits_start_where_they_say(init):
    """One Lloyd iteration from the init: its centroids are the weighted means of the init's nearest-center runs."""
    from any4lib.formats import _initial_centers

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    q = quantize(w, "any4", 64, init=init, max_iter=1)
    x = ((w.reshape(16, 2, 64) - w.reshape(16, 2, 64).amin(-1, keepdim=True))
         / (w.reshape(16, 2, 64).amax(-1, keepdim=True) - w.reshape(16, 2, 64).amin(-1, keepdim=True)) * 15)
    start = _initial_centers(init, x.reshape(16, -1), 16, seed=0)
    if init == "int":
        assert torch.equal(start, torch.arange(16.0)[None])
    elif init == "nf4":
        assert start[0, 0] == 0 and start[0, -1] == 15 and start[0, 7] == 7.5  # NF4's exact zero lands mid-range
    else:  # k points of each row
        assert all(torch.isin(start[r], x.reshape(16, -1)[r]).all() for r in range(16))
    assert not torch.equal(q.lut, quantize(w, "any4", 64).lut)  # a different start gives a different table


def test_kmeans_init_errors():
    with pytest.raises(ValueError, match="'nf4' for 4 bits only"):
        quantize(torch.randn(4, 64), "any3", 64, init="nf4")
    with pytest.raises(ValueError, match="k-means init 'grid'"):
        quantize(torch.randn(4, 64), "any4", 64, init="grid")


def test_ablation_errors_equal_their_direct_definitions(tiny):
    from any4lib.calibration import record_inputs
    from any4lib.lut_ablation import InputGram, _errors, variants

    model, tokenizer = tiny
    stats = calibrate(model, tokenizer, mode="online", progress=False)
    gram = record_inputs(model, stats.inputs, InputGram())
    quantized = quantize_model(copy.deepcopy(model), "any3", 64, stats, progress=False)
    errors = _errors(model, quantized, gram)
    num = den = wnum = wden = 0.0
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.update({n: a[0].reshape(-1, a[0].shape[-1]).double()}))
        for n, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        model(stats.inputs[0])
    for h in hooks:
        h.remove()
    for name, x in inputs.items():
        w = model.get_submodule(name).weight.double()
        d = w - quantized.get_submodule(name).quantized.dequantize(torch.float64)
        num, den = num + float((x @ d.T).pow(2).sum()), den + float((x @ w.T).pow(2).sum())
        wnum, wden = wnum + float(d.pow(2).sum()), wden + float(w.pow(2).sum())
    assert errors["output_error"] == pytest.approx(num / den, rel=1e-9)
    assert errors["weight_error"] == pytest.approx(wnum / wden, rel=1e-12)
    assert variants() == [("k-means++", "activation_x_scale"), ("random", "activation_x_scale"),
                          ("int", "activation_x_scale"), ("nf4", "activation_x_scale"),
                          ("k-means++", "weights"), ("k-means++", "activation")]


@pytest.mark.slow
@pytest.mark.real_data
def test_gptq_beats_rtn_on_the_reference_model_first_layers():
    """ref-en-16m, int4 g128: on the first block's q/k/v (whose inputs nothing quantized precedes), GPTQ's
    reconstruction error on the calibration inputs is below RTN's."""
    from any4lib.calibration import record_inputs
    from any4lib.lut_ablation import InputGram
    from any4lib.model import load_model
    from any4lib.paths import text_file

    if text_file("heldout") is None:
        pytest.skip("needs ../shared/data (ref-en-16m and the held-out text)")
    model, tokenizer = load_model("ref-en-16m", dtype=torch.float32)
    stats = calibrate(model, tokenizer, "heldout", n_samples=4, seq_len=256, mode="online", progress=False)
    layers = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    gram = record_inputs(model, stats.inputs, InputGram(), layers=layers)
    results = {
        m: quantize_model(copy.deepcopy(model), "int4", 128, stats, include="model.layers.0.*", method=m, progress=False)
        for m in ("rtn", "gptq")
    }
    for name in layers:
        w = model.get_submodule(name).weight.double()
        h = gram.gram[name].hessian()
        error = {m: float((((w - q.get_submodule(name).quantized.dequantize(torch.float64)) @ h)
                           * (w - q.get_submodule(name).quantized.dequantize(torch.float64))).sum())
                 for m, q in results.items()}
        assert error["gptq"] < 0.9 * error["rtn"], (name, error)
