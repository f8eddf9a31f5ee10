"""torch.compile of the decode step (generate(..., compile=True), `--compile`): the same tokens and logits as eager."""
import pytest
import torch

from minigptq import kernels
from minigptq.fast_decode import compiled_decode_step
from minigptq.generation import generate
from minigptq.loader import load_model
from minigptq.qlinear import QuantLinear
from minigptq.transformer import KVCache

pytestmark = pytest.mark.skipif(not kernels.cpu_available(), reason="needs the compiled CPU kernels")


def quantized_tiny(path, bits=4, seed=0):
    """The tiny checkpoint with every block linear replaced by a random act-order QuantLinear (real kernels)."""
    model = load_model(path, dtype="fp32")
    g = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for name, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                K, N = lin.in_features, lin.out_features
                G = K // 32
                g_idx = torch.arange(K)[torch.randperm(K, generator=g)] // 32  # act-order: shuffled groups
                ql = QuantLinear.from_codes(torch.randint(0, 2**bits, (N, K), generator=g),
                                            0.02 + 0.01 * torch.rand(G, N, generator=g),
                                            torch.randint(1, 2**bits, (G, N), generator=g), g_idx,
                                            lin.bias.detach() if lin.bias is not None else None, bits, 32,
                                            dtype=torch.float32)
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, ql)
    return model.eval()


def test_qgemm_custom_op_matches_the_kernel_and_passes_opcheck():
    K, N, G = 96, 64, 3
    g = torch.Generator().manual_seed(1)
    ql = QuantLinear.from_codes(torch.randint(0, 8, (N, K), generator=g), torch.rand(G, N, generator=g),
                                torch.randint(1, 8, (G, N), generator=g), torch.arange(K) // 32, None, 3, 32,
                                dtype=torch.float32)
    L = ql._layout
    x = torch.randn(3, K, generator=g)
    args = (x, L.qweight, L.scales, L.zeros, L.row_group, L.perm, L.bits, L.N)
    torch.testing.assert_close(kernels.qgemm_op(*args), kernels.cpu_qgemm(x, L), rtol=0, atol=0)
    torch.library.opcheck(kernels.qgemm_op, args)  # the fake (shape) function agrees with the real op
    if kernels.cpu_int8_available():  # the int8 kernels through the same op
        L8 = kernels.make_layout(ql.qweight, ql.qzeros, ql.scales, ql.g_idx, 3, "gptq", cpu_kernel="int8")
        args8 = (x, L8.qweight, L8.scales, L8.zeros, L8.row_group, L8.perm, L8.bits, L8.N, "int8")
        torch.testing.assert_close(kernels.qgemm_op(*args8), kernels.int8_reference(x, L8), rtol=0, atol=0)
        torch.library.opcheck(kernels.qgemm_op, args8)


def test_compiled_decode_gives_the_eager_tokens_and_logits(hf_checkpoints):
    model = quantized_tiny(hf_checkpoints("llama-gqa-tied"))
    prompts = [[5, 17, 99, 3, 42, 7], [8, 9, 300]]  # left-padded batch: the masked path with symbolic lengths
    eager, _ = generate(model, prompts, max_new_tokens=12)
    compiled, stats = generate(model, prompts, max_new_tokens=12, compile=True)
    assert compiled == eager
    assert len(stats.step_s) == 11
    assert compiled_decode_step(model) is compiled_decode_step(model)  # compiled once, kept on the model

    # Logits of single decode steps at several cache positions (one graph: start is a symbol, not a constant).
    step = compiled_decode_step(model)
    with torch.inference_mode():
        caches = [KVCache(model.cfg, 1, 64, torch.float32, "cpu") for _ in range(2)]
        prompt = torch.tensor([prompts[0]])
        for c in caches:
            model(prompt, c, 0)
        for i, tok in enumerate([11, 250, 3, 77]):
            t = torch.tensor([[tok]])
            want = model(t, caches[0], prompt.shape[1] + i)
            got = step(t, caches[1], prompt.shape[1] + i)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-5, atol=1e-5)  # the cache written in place
