"""Fast checks of what the data and the model do per data-parallel rank, without starting processes
(tests/test_distributed.py runs the real two-process jobs)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from azgpt.data.datamodule import AzGPTDataModule, FixedValBlocks
from azgpt.data.instructions import InstructionDataModule
from azgpt.targets import PAD_TARGET
from azgpt.train.module import AzGPT
from azgpt.data.prepare import PrepareConfig, prepare

BLOCK = 8


def fake_trainer(num_replicas: int, rank: int, global_step: int = 0, accumulate: int = 1) -> SimpleNamespace:
    """The few trainer attributes the datamodule reads (None sampler kwargs: a single-device strategy)."""
    kwargs = {"num_replicas": num_replicas, "rank": rank} if num_replicas > 1 else None
    return SimpleNamespace(distributed_sampler_kwargs=kwargs, global_step=global_step,
                           accumulate_grad_batches=accumulate)


@pytest.mark.parametrize("num_blocks", [1, 2, 5, 7, 8])
@pytest.mark.parametrize("replicas", [1, 2, 3, 8])
def test_val_blocks_shard_without_duplicates(num_blocks: int, replicas: int) -> None:
    tokens = np.arange(num_blocks * BLOCK + 1, dtype=np.uint16)
    dataset = FixedValBlocks(tokens, BLOCK, num_replicas=replicas)
    shards = [list(DistributedSampler(dataset, num_replicas=replicas, rank=r, shuffle=False)) for r in range(replicas)]
    assert len({len(shard) for shard in shards}) == 1  # every rank runs the same number of batches
    assert sorted(i for shard in shards for i in shard) == list(range(len(dataset)))  # nothing twice
    real = [i for shard in shards for i in shard if (dataset[i][1] != PAD_TARGET).all()]
    padding = [i for shard in shards for i in shard if (dataset[i][1] == PAD_TARGET).all()]
    assert sorted(real) == list(range(num_blocks))
    assert len(real) + len(padding) == len(dataset) < num_blocks + replicas
    for i in real:
        inputs, targets = dataset[i]
        assert torch.equal(inputs, torch.arange(i * BLOCK, (i + 1) * BLOCK))
        assert torch.equal(targets, inputs + 1)


def test_val_blocks_refuse_an_index_past_the_end() -> None:
    dataset = FixedValBlocks(np.arange(3 * BLOCK + 1, dtype=np.uint16), BLOCK, num_replicas=2)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> AzGPTDataModule:
    out = tmp_path_factory.mktemp("data") / "sample"
    prepare(PrepareConfig(out=out, vocab_size=300, block_size=32, val_fraction=0.1))
    dm = AzGPTDataModule(data_dir=str(out), vocab_size=300, block_size=32, batch_size=4, val_max_blocks=7)
    dm.setup("fit")
    return dm


def test_datamodule_shards_validation_by_the_strategys_replicas(datamodule: AzGPTDataModule) -> None:
    seen = []
    for rank in (0, 1):
        datamodule.trainer = fake_trainer(2, rank)
        loader = datamodule.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # so Lightning leaves it in place
        targets = torch.cat([batch[1] for batch in loader])
        seen.append(targets[(targets != PAD_TARGET).all(dim=1)])
    datamodule.trainer = fake_trainer(1, 0)
    single = datamodule.val_dataloader()
    assert not isinstance(single.sampler, DistributedSampler)
    everything = torch.cat([batch[1] for batch in single])
    assert len(everything) == 7 and len(seen[0]) == 4 and len(seen[1]) == 3
    assert torch.equal(torch.cat(seen).sort(dim=0).values, everything.sort(dim=0).values)


def test_datamodule_draws_training_blocks_for_its_replica_and_step(datamodule: AzGPTDataModule) -> None:
    datamodule.trainer = fake_trainer(4, 3, global_step=5, accumulate=2)
    dataset = datamodule.train_dataset()
    assert (dataset.rank, dataset.start_index) == (3, 10)
    datamodule.trainer = fake_trainer(1, 0, global_step=5, accumulate=2)
    assert datamodule.train_dataset().rank == 0



def test_instruction_data_splits_and_resumes_as_pretraining_blocks_do(datamodule: AzGPTDataModule) -> None:
    instructions = InstructionDataModule(tokenizer_json=datamodule.tokenizer_json, block_size=256, batch_size=4)
    instructions.setup()
    conversations = len(instructions._val)
    shares = []
    for rank in (0, 1):
        instructions.trainer = fake_trainer(2, rank, global_step=5, accumulate=2)
        loader = instructions.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler) and len(loader.dataset) % 2 == 0
        shares.append(list(loader.sampler))
        train = instructions.train_dataloader().dataset
        assert (train.rank, train.start_index) == (rank, 10)
    assert len(shares[0]) == len(shares[1]) and not set(shares[0]) & set(shares[1])
    assert sorted(i for share in shares for i in share if i < conversations) == list(range(conversations))

def test_padding_blocks_add_nothing_to_validation_metrics() -> None:
    torch.manual_seed(0)
    model = AzGPT(vocab_size=300, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16).eval()
    model.byte_lengths = torch.randint(1, 4, (model.config.padded_vocab_size,))
    inputs = torch.randint(0, 300, (3, BLOCK))
    targets = torch.randint(0, 300, (3, BLOCK))
    sums = []
    for batch in ((inputs[:2], targets[:2]), (inputs, torch.cat([targets[:2], torch.full((1, BLOCK), PAD_TARGET)]))):
        with torch.no_grad():
            model._evaluate_batch(batch)
        sums.append([m.compute().item() for m in (model.val_nll, model.val_tokens, model.val_bytes)])
        for metric in (model.val_nll, model.val_tokens, model.val_bytes):
            metric.reset()
    assert sums[0][1] == 2 * BLOCK
    assert sums[1] == pytest.approx(sums[0], rel=1e-6)
    assert model.val_nll.dtype == torch.float64


def test_weight_decay_goes_to_linear_and_embedding_weights_only() -> None:
    model = AzGPT(vocab_size=300, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, bias=True)
    model.trainer = SimpleNamespace(max_steps=10)  # read by the schedule
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    assert decay["weight_decay"] == model.hparams.weight_decay and no_decay["weight_decay"] == 0.0
