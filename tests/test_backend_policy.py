"""The one backend policy (``bayeskern.ops.backend.backend_for`` and its table ``POLICY``): its
decisions per op, device, dtype and forced backend, and that every op module routes through it."""

import importlib
import inspect
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import bayeskern.ops as ops
from bayeskern.ops import backend, philox
from bayeskern.ops.backend import POLICY, backend_for

NOISE_OPS = (
    "gaussian_sample",
    "gaussian_sample_backward",
    "weight_dropout",
    "weight_dropout_backward",
    "fill_normal_",
    "fill_uniform_",
)
DRAW_OPS = ("gaussian_sample_kl", "gaussian_sample_kl_backward", "weight_dropout_l2", "weight_dropout_l2_backward")
IVON_OPS = ("ivon_draw_", "ivon_collect_", "ivon_update_")
KL_OPS = ("gaussian_kl", "gaussian_kl_backward")
OP_MODULES = ("draw", "dropout", "fisher", "ivon", "kl", "noise", "sample", "sgld")


def _like(op: str, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A main tensor every condition of ``op`` accepts (a position axis for the Fisher op)."""
    shape = (2, 3, 4) if op == "sq_grad_accumulate" else (8,)
    return torch.zeros(shape, dtype=dtype, device=device)


def _fake_cuda(op: str, dtype=torch.float32) -> torch.Tensor:
    with FakeTensorMode():
        return _like(op, dtype, "cuda")


@pytest.fixture
def serving(monkeypatch):
    """Pretend exactly the given backends can run (on any device), to check the table without them."""

    def pretend(*names: str) -> None:
        monkeypatch.setattr(backend, "_serves", lambda name, device: name == "reference" or name in names)

    return pretend


@pytest.fixture
def cpp_on_cpu():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("the C++ extension does not build here")


# -- the table --------------------------------------------------------------------------------------
def test_table_covers_every_op_and_names_known_backends_and_devices():
    others = {"sgld_step_", "first_nonfinite", "sq_grad_accumulate", *IVON_OPS}
    assert set(POLICY) == {*NOISE_OPS, *DRAW_OPS, *KL_OPS, *others}
    for op, policy in POLICY.items():
        assert set(policy.kernels) <= {"triton", "cpp"}, op
        assert all(set(devices) <= {"cpu", "cuda"} for devices in policy.kernels.values()), op
        assert torch.float64 not in policy.dtypes, op
        assert (policy.triton_module is not None) == ("triton" in policy.kernels), op


@pytest.mark.parametrize("op", sorted(POLICY))
@pytest.mark.parametrize("forced", [None, "reference", "triton", "cpp"])
def test_float64_runs_the_reference_for_every_op_even_when_forced(op, forced, serving):
    serving("triton", "cpp")
    for tensor in (_like(op, torch.float64), _fake_cuda(op, torch.float64)):
        if forced is None:
            assert backend_for(op, tensor) == "reference"
        else:
            with ops.use_backend(forced):
                assert backend_for(op, tensor) == "reference"


@pytest.mark.parametrize("op", sorted(POLICY))
def test_forced_reference_runs_the_reference_for_every_op(op):
    with ops.use_backend("reference"):
        assert backend_for(op, _like(op)) == "reference"


@pytest.mark.parametrize("op", sorted(POLICY))
def test_forced_triton_on_cpu_without_the_interpreter_raises_naming_it(op, monkeypatch):
    if backend.triton_version() is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(backend, "triton_interpreter", lambda: False)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(op, _like(op))


def test_forced_backend_that_cannot_run_on_the_device_raises(serving):
    serving("triton")
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="'cpp' cannot run on cpu tensors"):
        backend_for("gaussian_sample", _like("gaussian_sample"))


def test_environment_variable_forces_like_use_backend(monkeypatch, serving):
    serving("triton", "cpp")
    monkeypatch.setenv("BAYESKERN_BACKEND", "reference")
    assert backend_for("gaussian_sample", _like("gaussian_sample")) == "reference"
    with ops.use_backend("cpp"):  # use_backend wins over the variable
        assert backend_for("gaussian_sample", _like("gaussian_sample")) == "cpp"


@pytest.mark.parametrize("op", [*NOISE_OPS, *DRAW_OPS, *KL_OPS, *IVON_OPS, "sgld_step_", "first_nonfinite"])
def test_cpu_float32_runs_cpp_when_the_extension_loads(op, cpp_on_cpu):
    assert backend_for(op, _like(op)) == "cpp"


@pytest.mark.parametrize("op", [*NOISE_OPS, *DRAW_OPS, *IVON_OPS, "sgld_step_", "first_nonfinite"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision_runs_cpp_except_the_kl(op, dtype, cpp_on_cpu):
    assert backend_for(op, _like(op, dtype)) == "cpp"
    assert backend_for("gaussian_kl", _like("gaussian_kl", dtype)) == "reference"


@pytest.mark.parametrize(
    "op", [*NOISE_OPS, *DRAW_OPS, *KL_OPS, *IVON_OPS, "sgld_step_", "first_nonfinite", "sq_grad_accumulate"]
)
def test_cpu_without_the_extension_runs_the_reference(op, serving):
    serving("triton")  # the interpreter is never chosen automatically
    assert backend_for(op, _like(op)) == "reference"


def test_cuda_prefers_triton_then_cpp(serving):
    serving("triton", "cpp")
    for op in (*NOISE_OPS, *DRAW_OPS, *IVON_OPS, "sgld_step_", "sq_grad_accumulate"):
        assert backend_for(op, _fake_cuda(op)) == "triton", op
    for op in (*KL_OPS, "first_nonfinite"):  # C++ CPU kernels only
        assert backend_for(op, _fake_cuda(op)) == "reference", op
    serving("cpp")
    for op in (*NOISE_OPS, *IVON_OPS, "sgld_step_"):
        assert backend_for(op, _fake_cuda(op)) == "cpp", op
    for op in (*DRAW_OPS, "sq_grad_accumulate"):  # no CUDA kernel in the C++ build: per-tensor ops / reference
        assert backend_for(op, _fake_cuda(op)) == "reference", op


def test_forced_cpp_on_cuda_serves_only_where_it_has_a_cuda_kernel(serving):
    serving("triton", "cpp")
    with ops.use_backend("cpp"):
        assert backend_for("gaussian_sample", _fake_cuda("gaussian_sample")) == "cpp"
        assert backend_for("sgld_step_", _fake_cuda("sgld_step_")) == "cpp"
        assert backend_for("gaussian_sample_kl", _fake_cuda("gaussian_sample_kl")) == "reference"
        assert backend_for("gaussian_kl", _fake_cuda("gaussian_kl")) == "reference"


def test_unknown_device_runs_the_reference_and_refuses_a_forced_kernel():
    meta = torch.zeros(8, device="meta")
    assert backend_for("gaussian_sample", meta) == "reference"
    with ops.use_backend("cpp"), pytest.raises(RuntimeError, match="cannot run on meta"):
        backend_for("gaussian_sample", meta)


# -- the op conditions ------------------------------------------------------------------------------
def test_fused_draws_need_one_dtype_and_device_and_float_prior_stds(serving):
    serving("triton", "cpp")
    mu = _like("gaussian_sample_kl")
    for op in DRAW_OPS:
        assert backend_for(op, mu, tensors=[mu, mu.clone()], prior_stds=[1.0, 0.5]) == "cpp"
        assert backend_for(op, mu, tensors=[mu, mu.half()], prior_stds=[1.0, 1.0]) == "reference"
        assert backend_for(op, mu, tensors=[mu], prior_stds=[torch.ones(8)]) == "reference"
        with ops.use_backend("triton"):
            assert backend_for(op, mu, tensors=[mu], prior_stds=[1.0]) == "triton"


def test_kl_kernel_needs_a_float_prior_std_and_a_matching_prior_mean(serving):
    serving("triton", "cpp")
    mu = _like("gaussian_kl")
    assert backend_for("gaussian_kl", mu, prior_mean=None, prior_std=2.0) == "cpp"
    assert backend_for("gaussian_kl", mu, prior_mean=torch.ones(8), prior_std=2.0) == "cpp"
    assert backend_for("gaussian_kl", mu, prior_mean=None, prior_std=torch.tensor(2.0)) == "reference"
    assert backend_for("gaussian_kl", mu, prior_mean=torch.ones(8, dtype=torch.float64)) == "reference"
    assert backend_for("gaussian_kl", mu, prior_mean=torch.ones(1)) == "reference"
    with ops.use_backend("triton"):  # no Triton kernel: the reference serves
        assert backend_for("gaussian_kl", mu) == "reference"


def test_first_nonfinite_fast_path_needs_dense_cpu_kernel_tensors(serving):
    serving("cpp")
    dense = [torch.zeros(8), torch.zeros(3, dtype=torch.bfloat16)]
    assert backend_for("first_nonfinite", dense[0], tensors=dense) == "cpp"
    strided = [torch.zeros(4, 4).t()]
    assert backend_for("first_nonfinite", strided[0], tensors=strided) == "reference"
    mixed = [torch.zeros(8), torch.zeros(8, dtype=torch.float64)]
    assert backend_for("first_nonfinite", mixed[0], tensors=mixed) == "reference"


def test_fisher_triton_only_for_a_position_axis_and_on_cpu_only_when_forced(serving):
    serving("triton", "cpp")
    positions, rows, single = torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 1, 4)
    assert backend_for("sq_grad_accumulate", positions) == "reference"  # CPU: MKL's GEMMs
    with ops.use_backend("triton"):
        assert backend_for("sq_grad_accumulate", positions) == "triton"
        assert backend_for("sq_grad_accumulate", rows) == "reference"
        assert backend_for("sq_grad_accumulate", single) == "reference"
    with ops.use_backend("cpp"):  # no C++ kernel
        assert backend_for("sq_grad_accumulate", positions) == "reference"


def test_fisher_decision_on_cpu_does_not_build_the_extension(monkeypatch):
    monkeypatch.setattr(backend.extension, "load", lambda: pytest.fail("the extension was loaded"))
    assert backend_for("sq_grad_accumulate", torch.zeros(2, 3, 4)) == "reference"


# -- the kernel namespaces --------------------------------------------------------------------------
def test_kernel_namespace_of_every_op_holds_its_kernel(cpp_on_cpu):
    for op, policy in POLICY.items():
        for name in policy.kernels:
            namespace = backend.kernels(name, op)
            if name == "triton":
                assert namespace.__name__ == f"bayeskern.kernels.{policy.triton_module}", op
            assert hasattr(namespace, op), (name, op)
    assert backend.kernels("triton").__name__ == "bayeskern.kernels.noise"
    with pytest.raises(ValueError, match="has no kernels"):
        backend.kernels("reference", "gaussian_sample")


# -- every op module routes through the policy ------------------------------------------------------
class _Routed(Exception):
    pass


def _public_ops(device):
    """(name, op key, call) of each public op, on small float32 inputs."""
    x = torch.randn(6, device=device)
    rho = torch.full((6,), -3.0, device=device)
    g3, a3 = torch.randn(3, 4, 2, device=device), torch.randn(3, 4, 5, device=device)
    return [
        ("gaussian_sample", lambda: ops.gaussian_sample(x, rho, 1)),
        ("weight_dropout", lambda: ops.weight_dropout(x, 0.3, 1)),
        ("fill_normal_", lambda: ops.noise.normal((6,), 1, device=device)),
        ("sgld_step_", lambda: ops.sgld_step_([x.clone()], [x], lr=0.1, num_data=10, seed=1, step=0, offsets=[0])),
        (
            "sgld_step_",
            lambda: ops.sgld(
                [x.clone()],
                [x],
                [],
                [],
                lr=0.1,
                num_data=10,
                prior_std=1.0,
                temperature=1.0,
                alpha=0.99,
                eps=1e-8,
                seed=1,
                step=0,
                offsets=[0],
            ),
        ),
        ("first_nonfinite", lambda: ops.first_nonfinite([x, rho])),
        ("gaussian_sample_kl", lambda: ops.gaussian_sample_kl([x], [rho], [None], [1.0], 1, [0])),
        ("weight_dropout_l2", lambda: ops.weight_dropout_l2([x], 0.3, [None], [1.0], 1, [0])),
        ("gaussian_kl", lambda: ops.gaussian_kl(x, rho)),
        ("sq_grad_accumulate", lambda: ops.sq_grad_accumulate(torch.zeros(2, 5, device=device), g3, a3)),
    ]


@pytest.fixture
def routed(monkeypatch):
    """Replace the kernel namespace lookup of backend.py and of every op module by one that raises."""

    def refuse(name, op=None):
        raise _Routed(name, op)

    for module in ("backend", *OP_MODULES):
        module = importlib.import_module(f"bayeskern.ops.{module}")
        if hasattr(module, "kernels"):
            monkeypatch.setattr(module, "kernels", refuse)


def test_forced_reference_runs_every_public_op_without_a_kernel(routed, device):
    with ops.use_backend("reference"):
        for _name, call in _public_ops(device):
            call()  # _Routed would mean a module chose a kernel on its own


def test_forced_kernel_backend_reaches_exactly_the_kernels_the_policy_names(routed, kernel_backend, device):
    with ops.use_backend(kernel_backend):
        for op, call in _public_ops(device):
            main = _like(op, device=device)
            expected = backend_for(op, main)
            if expected == "reference":
                call()
                continue
            with pytest.raises(_Routed) as routed_to:
                call()
            assert routed_to.value.args == (expected, op), op


def test_gaussian_sample_on_forced_reference_equals_the_specification():
    mu, rho = torch.randn(10), torch.randn(10)
    with ops.use_backend("reference"):
        assert torch.equal(ops.gaussian_sample(mu, rho, 3, 4), ops.reference_gaussian_sample(mu, rho, 3, 4))


def test_no_op_module_decides_a_backend_itself():
    """Only backend.py reads the forced backend, the device's backends or the extension's state."""
    root = Path(inspect.getfile(backend)).parent
    deciding = (
        "requested_backend",
        "available_backends",
        "triton_interpreter",
        "_serves",
        "extension.load",
        "resolve(",
    )
    for path in root.glob("*.py"):
        if path.name in ("backend.py", "extension.py", "__init__.py"):
            continue
        text = path.read_text()
        assert not [word for word in deciding if word in text], path.name


def test_tensor_offsets_place_tensors_on_whole_philox_blocks():
    assert philox.tensor_offsets([(3,), (4,), (2, 3), ()]) == [0, 4, 8, 16]
    assert [philox.tensor_span(n) for n in (0, 1, 4, 5)] == [0, 4, 4, 8]
