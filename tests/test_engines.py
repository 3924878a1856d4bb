"""How SparseTrainer meets the distributed engines, checked with stand-ins for the accelerator, its state and the
arguments (no processes): the FSDP2-on-CPU shim and the refusals. The real 2-process runs under FSDP2 and DeepSpeed
are tests/test_distributed.py and tests/test_recipes.py."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from hf_sparse.backends import EnginesMixin, check_fsdp_arguments, fsdp_on_cpu, refuse_sharded_warmup_teacher
from hf_sparse.trainer_checkpoint import CheckpointMixin


def test_fsdp1_on_cpu_processes_is_refused_and_plain_data_parallel_is_left_alone(monkeypatch):
    """`fsdp_on_cpu` (the FSDP2-on-CPU shim) refuses FSDP1 naming the fix, and touches neither a CPU data-parallel
    run without an FSDP config nor a state Accelerate already set up. Stand-ins for the accelerator and the
    arguments: the real 2-process FSDP2 run is tests/test_distributed.py."""
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # as `accelerate launch` sets it for an FSDP config

    def accelerator(kind):
        return SimpleNamespace(state=SimpleNamespace(distributed_type=kind, mixed_precision="no"))

    with pytest.raises(ValueError, match=r"FSDP version 1 .*'version': 2"):
        fsdp_on_cpu(accelerator(DistributedType.MULTI_CPU), SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1}))
    ddp = accelerator(DistributedType.MULTI_CPU)
    assert not fsdp_on_cpu(ddp, SimpleNamespace(fsdp_plugin_args=None))
    assert ddp.state.distributed_type == DistributedType.MULTI_CPU and not hasattr(ddp.state, "fsdp_plugin")
    gpu = accelerator(DistributedType.MULTI_GPU)
    assert not fsdp_on_cpu(gpu, SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}))
    assert gpu.state.distributed_type == DistributedType.MULTI_GPU


def test_the_trainers_fsdp_checks_hold_when_fsdp_is_turned_on_for_cpu():
    """The Trainer checks FSDP's arguments before the shim turns FSDP on: the shim repeats them."""
    plain = dict(activation_checkpointing=False, save_only_model=False, load_best_model_at_end=True)
    check_fsdp_arguments(SimpleNamespace(**plain), SimpleNamespace(activation_checkpointing=True))  # fine
    with pytest.raises(ValueError, match="activation_checkpointing"):
        check_fsdp_arguments(SimpleNamespace(**{**plain, "activation_checkpointing": True}),
                             SimpleNamespace(activation_checkpointing=True))
    with pytest.raises(ValueError, match="save_only_model"):
        check_fsdp_arguments(SimpleNamespace(**{**plain, "save_only_model": True}),
                             SimpleNamespace(activation_checkpointing=False))


def _engine_trainer(fsdp=False, zero_stage=None, state_dict_type="StateDictType.FULL_STATE_DICT", gather=True):
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type=state_dict_type))
    if zero_stage is not None:
        zero = {"stage": zero_stage, "stage3_gather_16bit_weights_on_model_save": gather}
        state.deepspeed_plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={"zero_optimization": zero})
    return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=zero_stage is not None,
                           accelerator=SimpleNamespace(state=state))


def test_the_warmup_teacher_is_refused_where_the_weights_are_sharded():
    warmup = SimpleNamespace(distill_from="warmup")
    for trainer, engine in [(_engine_trainer(fsdp=True), "FSDP"), (_engine_trainer(zero_stage=3), "DeepSpeed ZeRO-3"),
                            (_engine_trainer(zero_stage=2), None), (_engine_trainer(), None)]:
        assert EnginesMixin.sharding_engine(trainer) == engine
        if engine is None:
            refuse_sharded_warmup_teacher(warmup, engine)  # ZeRO-2 and DDP keep whole weights: a copy is fine
        else:
            with pytest.raises(ValueError, match=f"{engine}.*teacher_model"):
                refuse_sharded_warmup_teacher(warmup, engine)
    refuse_sharded_warmup_teacher(SimpleNamespace(distill_from="model"), "FSDP")  # a teacher passed in: fine


def test_unsharded_model_refuses_engines_that_would_not_save_one_whole_model():
    CheckpointMixin._check_gatherable(_engine_trainer(fsdp=True))
    CheckpointMixin._check_gatherable(_engine_trainer(zero_stage=3))
    CheckpointMixin._check_gatherable(_engine_trainer(zero_stage=2, gather=False))
    with pytest.raises(ValueError, match="FULL_STATE_DICT"):
        CheckpointMixin._check_gatherable(_engine_trainer(fsdp=True, state_dict_type="StateDictType.SHARDED_STATE_DICT"))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        CheckpointMixin._check_gatherable(_engine_trainer(zero_stage=3, gather=False))
