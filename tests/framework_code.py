"""Load verl's, OpenRLHF's and torchtune's own RLHF code on a CPU, for the parity tests.

Each framework's full install needs CUDA-only packages, so `.ci/run` installs them with --no-deps and
the pieces the math needs (see there). What loads how:
- verl 0.9.1: `verl.trainer.ppo.core_algos` imports normally once ray, tensordict, omegaconf, codetiming
  and pylatexenc are installed.
- OpenRLHF 0.11.2: its package __init__ files pull in deepspeed, peft, ray and vLLM, so single files are
  loaded by path under a private package name; imports those files make but the functions under test
  never call get empty stand-ins (named below, at each load).
- torchtune 0.6.1: `import torchtune` checks for torchao and imports its tokenizers (sentencepiece).
  torchao 0.11.0 imports with torch 2.13 (0.12.0 does not: it needs `torch._inductor.kernel.flex_attention`,
  gone in 2.13); 0.10, 0.11, 0.13, 0.14.1 and 0.16 all import. So torchtune is imported normally.

Locally a missing framework skips with the install command; `.ci/run` sets RLHF_REQUIRE_PARITY=1,
which turns that skip into a failure, so CI never passes with a parity test silently skipped.
"""

import importlib.util
import os
import sys
import types

import pytest

REQUIRE = os.environ.get("RLHF_REQUIRE_PARITY") == "1"


def unavailable(what: str, install: str, error: Exception | None = None):
    msg = f"{what} is not importable ({install})" + (f": {type(error).__name__}: {error}" if error else "")
    if REQUIRE:
        pytest.fail(msg + " [RLHF_REQUIRE_PARITY=1: CI must run every parity test]")
    pytest.skip(msg)


def load_verl():
    """verl/trainer/ppo/core_algos.py (and verl.utils.torch_functional, which it uses for whitening)."""
    try:
        import verl.trainer.ppo.core_algos as core_algos
        import verl.utils.torch_functional as verl_F
        from verl.workers.config import ActorConfig
    except Exception as e:  # ImportError, or a transitive dependency failing at import
        unavailable("verl 0.9.1", "pip install --no-deps verl==0.9.1; pip install ray tensordict omegaconf "
                    "codetiming pylatexenc", e)
    return types.SimpleNamespace(core_algos=core_algos, F=verl_F, ActorConfig=ActorConfig)


def load_torchtune():
    """torchtune.rlhf (rewards.py: get_rewards_ppo, estimate_advantages, whiten) and rlhf.loss.PPOLoss."""
    try:
        import torchtune.rlhf as rlhf
        from torchtune.rlhf.loss import PPOLoss
    except Exception as e:
        unavailable("torchtune 0.6.1", "pip install --no-deps torchtune==0.6.1 torchao==0.11.0; pip install sentencepiece", e)
    return types.SimpleNamespace(rlhf=rlhf, PPOLoss=PPOLoss)


def _load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_openrlhf_experience_maker():
    """openrlhf/trainer/ppo_utils/experience_maker.py and models/loss.py, loaded by path.

    Real: the file itself, models/utils.py (compute_reward, compute_approx_kl, masked_mean), models/loss.py,
    trainer/ppo_utils/length_penalty.py and utils/logging_utils.py. Stand-ins (empty modules): ray,
    deepspeed (models/utils.py's set_z3_leaf_modules only), ppo_utils.experience (the Experience class is
    a type hint there), trainer.ray.launcher (RayActorGroup, for the remote forward passes), and
    utils.seqlen_balancing (micro-batch planning). sys.modules is restored afterwards."""
    spec = importlib.util.find_spec("openrlhf")  # does not run openrlhf/__init__.py
    if spec is None or not spec.submodule_search_locations:
        unavailable("openrlhf 0.11.2", "pip install --no-deps openrlhf==0.11.2")
    root = list(spec.submodule_search_locations)[0]
    stand_ins = {
        "ray": {}, "deepspeed": {},
        "openrlhf": {}, "openrlhf.models": {}, "openrlhf.trainer": {}, "openrlhf.trainer.ppo_utils": {},
        "openrlhf.trainer.ppo_utils.experience": {"Experience": object},
        "openrlhf.trainer.ray": {}, "openrlhf.trainer.ray.launcher": {"RayActorGroup": object},
        "openrlhf.utils": {},
        "openrlhf.utils.seqlen_balancing": {"get_minimum_num_micro_batch_size": None,
                                            "get_seqlen_balanced_partitions": None},
    }
    real = [("openrlhf.utils.logging_utils", "utils/logging_utils.py"), ("openrlhf.models.utils", "models/utils.py"),
            ("openrlhf.models.loss", "models/loss.py"),
            ("openrlhf.trainer.ppo_utils.length_penalty", "trainer/ppo_utils/length_penalty.py")]
    names = list(stand_ins) + [n for n, _ in real] + ["_orlhf_experience_maker"]
    saved = {k: sys.modules.get(k) for k in names}
    try:
        for name, attrs in stand_ins.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
        loaded = {name: _load_file(name, os.path.join(root, path)) for name, path in real}
        maker = _load_file("_orlhf_experience_maker", os.path.join(root, "trainer/ppo_utils/experience_maker.py"))
    except Exception as e:
        unavailable("openrlhf 0.11.2 experience_maker.py", "pip install --no-deps openrlhf==0.11.2", e)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(maker=maker, utils=loaded["openrlhf.models.utils"], loss=loaded["openrlhf.models.loss"])
