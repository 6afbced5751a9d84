"""Hadamard rotations (QuaRot, Ashkboos et al. 2024): rotate the residual stream so activations lose their outlier
channels, leaving the float model's function unchanged.

rotate_model, on a Llama-style decoder:
  1. folds every RMSNorm's weight into the linears it feeds (q/k/v, gate/up, and the final norm into lm_head), so
     the norms become weightless and commute with an orthogonal matrix;
  2. R1: multiplies the residual stream by one randomized Hadamard matrix Q = diag(+-1) H / sqrt(n): the
     embeddings' rows and every reader's input columns by Q (W <- W Q), every writer's output rows by Q^T
     (o_proj, down_proj), lm_head's input columns by Q; a tied lm_head is untied first;
  3. R4: down_proj's input is rotated online by H / sqrt(n) (`input_rotation = "hadamard"`, fused W <- W H),
     so the MLP's intermediate activations are quantized in the rotated basis.

H of order n: Sylvester's for n = 2^k, else the Kronecker product of a Paley matrix of order q + 1 (q a prime
= 3 mod 4: 12, 20, 24, 32, 44, ...) with Sylvester's, e.g. 384 = 12 x 32. A width with neither gets a seeded random
orthogonal matrix for R1 (fused, nothing to run online); an online rotation needs a Hadamard order.
The online transform runs as a fast Walsh-Hadamard butterfly (n log n) on the power-of-two factor.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

ONLINE = ("hadamard",)
NORM_CONSUMERS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def paley_hadamard(order: int) -> torch.Tensor:
    """A Hadamard matrix of `order` = q + 1, q a prime = 3 mod 4 (Paley's first construction), float64: I + S with
    S = [[0, 1^T], [-1, Q]] and Q[i, j] = chi(j - i), chi the quadratic character mod q."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley's construction gives orders q + 1 for a prime q = 3 mod 4; {order} is not one")
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in residues else -1.0 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(order, order, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(order, dtype=torch.float64) + s


def sylvester_hadamard(order: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of a power-of-two order (symmetric; the fast Walsh-Hadamard transform's)."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p the largest power of two such that a Hadamard matrix of order m is known here (1,
    2 or a Paley order); None when there is none."""
    p = n & -n  # largest power of two dividing n
    m = n // p
    while not (m in (1, 2) or (_is_prime(m - 1) and (m - 1) % 4 == 3)):
        if p == 1:
            return None
        m, p = 2 * m, p // 2  # Paley orders are multiples of 4 (12 = 3 * 4): move factors of two into m
    return m, p


def hadamard_matrix(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I), float64: kron(H_m, Sylvester H_p)."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard matrix of order {n} here: orders are 2^k times 1, 2 or q + 1 (q a prime = 3 "
                         "mod 4, e.g. 12, 20, 24, 44); use a random orthogonal rotation for this width")
    m, p = factors
    small = paley_hadamard(m) if m > 2 else sylvester_hadamard(m)
    return torch.kron(small, sylvester_hadamard(p))


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None]


def residual_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """R1: diag(random signs) H / sqrt(n) (QuaRot's randomized Hadamard), or random_orthogonal where no Hadamard
    order fits n. float64, orthogonal."""
    if hadamard_factors(n) is None:
        return random_orthogonal(n, seed)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n) / n**0.5


def fast_walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p along the last dimension (p a power of two, unnormalised), by log2(p) butterfly passes."""
    p = x.shape[-1]
    shape, h = x.shape, 1
    while h < p:
        y = x.reshape(*shape[:-1], p // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(shape)


@functools.lru_cache(maxsize=None)
def _small_factor(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    small = paley_hadamard(m) if m > 2 else sylvester_hadamard(m)
    return small.to(dtype=dtype, device=device)


def rotate_online(x: torch.Tensor, rotation: str) -> torch.Tensor:
    """x @ H / sqrt(n) along the last dimension (rotation "hadamard", H = hadamard_matrix(n)): y = H_m^T X H_p on x
    viewed as [..., m, p], the power-of-two factor by the fast transform."""
    if rotation not in ONLINE:
        raise ValueError(f"unknown online rotation {rotation!r}; known: {ONLINE}")
    n = x.shape[-1]
    factors = hadamard_factors(n)
    if factors is None:
        hadamard_matrix(n)  # raises, naming the orders that exist
    m, p = factors
    y = fast_walsh_hadamard(x.reshape(*x.shape[:-1], m, p))
    if m > 1:
        y = torch.einsum("am,...ap->...mp", _small_factor(m, y.dtype, str(y.device)), y)
    return y.reshape(x.shape) / n**0.5


def _online_hook(module, args):
    return (rotate_online(args[0], module.input_rotation), *args[1:])


@torch.no_grad()
def fold_norm(norm: nn.Module, consumers: list[nn.Linear]) -> None:
    """Move an RMSNorm's weight into the input columns of the linears it feeds; the norm's weight becomes 1."""
    for linear in consumers:
        linear.weight.mul_(norm.weight.to(linear.weight)[None])
    norm.weight.fill_(1.0)


@torch.no_grad()
def _rotate_input(linear: nn.Linear, q: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.double() @ q.to(linear.weight.device)).to(linear.weight.dtype))


@torch.no_grad()
def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    q = q.to(linear.weight.device)
    linear.weight.copy_((q.T @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ q).to(linear.bias.dtype))


def _llama_parts(model: nn.Module):
    from .pipeline import decoder_blocks

    inner = getattr(model, "model", None)
    embed, final_norm = getattr(inner, "embed_tokens", None), getattr(inner, "norm", None)
    head = getattr(model, "lm_head", None)
    _, blocks = decoder_blocks(model)
    needed = [n for n, _ in NORM_CONSUMERS] + list(READERS) + list(WRITERS)
    for block in blocks:
        absent = [n for n in needed if not _has(block, n)]
        if absent or embed is None or final_norm is None or head is None:
            raise ValueError(f"rotation needs a Llama-style decoder (embed_tokens, norm, lm_head, and per block "
                             f"{', '.join(needed)}); {type(model).__name__} lacks {absent or 'embed/norm/lm_head'}")
    return embed, final_norm, head, blocks


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down_proj: bool = True) -> torch.Tensor:
    """Apply QuaRot's R1 (and R4 on down_proj when `online_down_proj`) to the float `model` in place, keeping its
    function (see the module doc); returns R1. down_proj layers get `input_rotation = "hadamard"` and a forward
    pre-hook that rotates their input (quantize_model hands the attribute to their QuantLinear)."""
    from .nn import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("rotate the float model before quantizing it (it already holds QuantLinear layers)")
    embed, final_norm, head, blocks = _llama_parts(model)
    if head.weight is embed.weight:  # tied: the head gets the final norm folded in, the embeddings do not
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    for block in blocks:
        for norm, consumers in NORM_CONSUMERS:
            fold_norm(block.get_submodule(norm), [block.get_submodule(c) for c in consumers])
    fold_norm(final_norm, [head])
    q = residual_rotation(embed.weight.shape[1], seed)
    embed.weight.copy_((embed.weight.double() @ q.to(embed.weight.device)).to(embed.weight.dtype))
    _rotate_input(head, q)
    for block in blocks:
        for name in READERS:
            _rotate_input(block.get_submodule(name), q)
        for name in WRITERS:
            _rotate_output(block.get_submodule(name), q)
        if online_down_proj:
            down = block.get_submodule("mlp.down_proj")
            _rotate_input(down, hadamard_matrix(down.in_features) / down.in_features**0.5)
            down.input_rotation = "hadamard"
            down.register_forward_pre_hook(_online_hook)
    return q
