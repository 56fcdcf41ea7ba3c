"""The C kernels: the bf16 softmax against float32's within one bf16 rounding, its edge
values, and how building them fails or is reused."""

import ctypes
import functools
import shutil
import subprocess

import pytest
import torch

from diffuse import kernels

needs_kernel = pytest.mark.skipif(
    not kernels.softmax_bf16_(torch.zeros(1, 1, dtype=torch.bfloat16)), reason=kernels.status()
)

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler cc")

# Below float32's smallest normal number the kernel's rounding to bf16 gives 0.
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def softmax_by_kernel(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.clone()
    assert kernels.softmax_bf16_(scores)
    return scores


@needs_kernel
@pytest.mark.parametrize("cols", [1, 5, 16, 17, 77, 1024, 4097])
@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0])
def test_softmax_is_float32s_rounded_once_to_bf16(cols, spread):
    torch.manual_seed(cols)
    scores = (torch.randn(37, cols) * spread).bfloat16()
    exact = scores.float().softmax(-1)
    got = softmax_by_kernel(scores).float()
    # One rounding to bf16's 8 significant bits: at most 2^-8 of the value.
    assert ((got - exact).abs() <= exact * 2**-8 + SMALLEST_NORMAL).all()
    # And PyTorch's bf16 softmax, which rounds the same float32 result, nearly always
    # agrees (it keeps values below float32's normal range, which the kernel makes 0).
    normal = exact >= SMALLEST_NORMAL
    assert (got == scores.softmax(-1).float())[normal].float().mean() > 0.99


@needs_kernel
def test_softmax_rows_can_be_a_view_into_wider_rows():
    torch.manual_seed(0)
    wide = torch.randn(6, 40).bfloat16()
    before = wide.clone()
    assert kernels.softmax_bf16_(wide[1:5, 3:30])
    torch.testing.assert_close(wide[1:5, 3:30].float(), before[1:5, 3:30].float().softmax(-1), rtol=2**-8, atol=0)
    untouched = torch.ones_like(wide, dtype=torch.bool)
    untouched[1:5, 3:30] = False
    assert torch.equal(wide[untouched], before[untouched])


@needs_kernel
def test_softmax_edge_values():
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor(
        [
            [0.0, -inf, 0.0, -inf],  # masked scores get exactly 0
            [1.0, nan, 2.0, 3.0],  # a NaN spreads over its row only
            [5.0, 5.0, 5.0, 5.0],
            [3e38, -3e38, 0.0, 3e38],
        ]
    ).bfloat16()  # far apart: no overflow
    got = softmax_by_kernel(scores).float()
    assert got[0].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert got[1].isnan().all()
    assert got[2].tolist() == [0.25] * 4
    assert got[3].tolist() == [0.5, 0.0, 0.0, 0.5]


def test_softmax_refuses_what_it_cannot_read():
    if not kernels.softmax_bf16_(torch.zeros(1, 1, dtype=torch.bfloat16)):
        pytest.skip(kernels.status())
    with pytest.raises(ValueError, match="contiguous rows"):
        kernels.softmax_bf16_(torch.zeros(4, 4, dtype=torch.bfloat16).t())
    with pytest.raises(ValueError, match="float32"):
        kernels.softmax_bf16_(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="outside autograd"):
        kernels.softmax_bf16_(torch.zeros(4, 4, dtype=torch.bfloat16, requires_grad=True))
    empty = torch.zeros(0, 4, dtype=torch.bfloat16)
    assert kernels.softmax_bf16_(empty)


def test_a_missing_compiler_is_a_reason_not_an_error(tmp_path):
    with pytest.raises(kernels.KernelUnavailable, match="no C compiler 'no-such-cc'"):
        kernels.build(kernels.SOURCE, tmp_path, "no-such-cc")


@needs_compiler
def test_a_failed_compile_names_the_file_and_leaves_nothing(tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return }\n")
    with pytest.raises(kernels.KernelUnavailable, match=r"could not compile broken\.c: .*error"):
        kernels.build(broken, tmp_path / "built", "cc")
    assert list((tmp_path / "built").iterdir()) == []


@needs_compiler
def test_a_built_kernel_is_reused_and_a_changed_source_rebuilt(tmp_path, monkeypatch):
    source = tmp_path / "k.c"
    source.write_text("int answer(void) { return 42; }\n")
    built = kernels.build(source, tmp_path / "cache", "cc")
    assert built.exists() and built.parent == tmp_path / "cache"

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert kernels.build(source, tmp_path / "cache", "cc") == built
    source.write_text("int answer(void) { return 43; }\n")
    with pytest.raises(AssertionError, match="compiled again"):
        kernels.build(source, tmp_path / "cache", "cc")


@needs_compiler
def test_a_changed_header_beside_the_source_rebuilds_it(tmp_path, monkeypatch):
    source, header = tmp_path / "k.c", tmp_path / "shared.h"
    header.write_text("#define ANSWER 42\n")
    source.write_text('#include "shared.h"\nint answer(void) { return ANSWER; }\n')
    built = kernels.build(source, tmp_path / "cache", "cc")
    assert ctypes.CDLL(str(built)).answer() == 42
    header.write_text("#define ANSWER 43\n")
    rebuilt = kernels.build(source, tmp_path / "cache", "cc")
    assert rebuilt != built and ctypes.CDLL(str(rebuilt)).answer() == 43


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFUSE_KERNELS", "0")
    with pytest.raises(kernels.KernelUnavailable, match="DIFFUSE_KERNELS=0"):
        kernels.load_softmax()


@pytest.mark.parametrize(
    "failure, reason",
    [
        (kernels.KernelUnavailable("no C compiler 'cc' on PATH"), "no C compiler 'cc' on PATH"),
        (RuntimeError("Could not determine home directory."), "RuntimeError: Could not determine home directory."),
        (PermissionError("[Errno 13] Permission denied: '/proc/self/maps'"), "PermissionError: [Errno 13]"),
    ],
)
def test_a_kernel_that_cannot_be_built_is_tried_once(monkeypatch, failure, reason):
    """Without the kernel the caller falls back on each call, so the failure must be remembered."""
    attempts = []

    def unavailable():
        attempts.append(1)
        raise failure

    monkeypatch.setattr(kernels, "load_softmax", unavailable)
    monkeypatch.setattr(kernels, "_softmax_kernel", functools.cache(kernels._softmax_kernel.__wrapped__))
    scores = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert not kernels.softmax_bf16_(scores) and not kernels.softmax_bf16_(scores)
    assert attempts == [1] and kernels.status().startswith(f"bf16 softmax kernel not used: {reason}")
    assert torch.equal(scores, torch.zeros(2, 3, dtype=torch.bfloat16))


def test_a_damaged_built_file_is_a_reason_not_an_error(tmp_path, monkeypatch):
    damaged = tmp_path / "softmax_bf16-0123456789abcdef.so"
    damaged.write_bytes(b"\x7fELF and then nothing")
    monkeypatch.setattr(kernels, "build", lambda source, folder, compiler: damaged)
    if not kernels.status().startswith("bf16 softmax kernel: "):  # the platform checks come first
        pytest.skip(kernels.status())
    with pytest.raises(kernels.KernelUnavailable, match=f"could not load {damaged}"):
        kernels.load_softmax()
