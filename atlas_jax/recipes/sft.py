"""Teacher SFT: masked next-token cross-entropy on teaching traces.

  1. Model (random init or a Hugging Face checkpoint, straight onto the mesh) and tokenizer.
  2. Train batches: a Grain iterator of process-local rows, made global per step.
  3. Optimizer and train state; resume from output_dir/checkpoints or `resume_from`.
  4. The accumulated update step and the eval (loss, perplexity) on the eval split.
  5. The loop: logging, eval, checkpoints, SIGTERM, NaN guard.
  6. Export a Hugging Face directory to output_dir/hf.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
from flax import nnx

from atlas_jax import parallel
from atlas_jax.config import TrainConfig, accumulation_steps, to_yaml
from atlas_jax.data import sft_batches, sft_num_examples, to_global
from atlas_jax.data.sft import row_length
from atlas_jax.models import load_model, load_tokenizer, lora, param_count, save_pretrained
from atlas_jax.train import checkpoint, loop, metrics as metrics_lib, offload, sft
from atlas_jax.train.checkpoint import Checkpointer
from atlas_jax.train.optim import make_optimizer, make_schedule
from atlas_jax.train.state import create_train_state
from atlas_jax.train.step import make_train_step


def run(cfg: TrainConfig, mesh) -> dict:
    t, b, out = cfg.trainer, cfg.batch, pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))

    # 1. Model and tokenizer.
    model = load_model(cfg.model, mesh=mesh, seed=cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    # with LoRA only the adapters are trained; the frozen base rides along, never copied
    graphdef, params, frozen = lora.split_trainable(model)
    del model  # params now live in the train state only

    # 2. Train batches (repeating; the step count decides when to stop).
    batches = sft_batches(cfg.data, tokenizer, split="train", batch_size=b.global_batch_size, seed=cfg.seed)
    examples = sft_num_examples(cfg.data, tokenizer, split="train")
    total = loop.total_steps(t, examples, b.global_batch_size)

    # 3. Optimizer, state, resume.
    optimizer, schedule = make_optimizer(t, total), make_schedule(t, total)
    state, shardings = create_train_state(params, optimizer, mesh, seed=cfg.seed)
    state, shardings, frozen = offload.apply(state, shardings, frozen, offload.resolve(t.offload, mesh))
    checkpointer = Checkpointer(str(out / "checkpoints"), save_steps=t.save_steps, max_to_keep=t.save_total_limit)
    state = checkpoint.resume(checkpointer, cfg.resume_from, state, batches)

    # 4. Update step and eval.
    accum = accumulation_steps(b.global_batch_size, b.micro_batch_size, parallel.data_parallel_size(mesh))
    train_step = make_train_step(sft.make_sft_loss(graphdef), optimizer, accum_steps=accum, mesh=mesh,
                                 state_shardings=shardings, schedule=schedule, frozen=frozen,
                                 combine=lora.combine, row_keys=cfg.model.lora.dropout > 0)
    full = lambda p: lora.full_params(p, frozen)  # noqa: E731
    eval_step = sft.make_eval_step(graphdef, mesh, jax.tree.map(lambda x: x.sharding, full(state.params)))

    def evaluate(state):
        rows = sft_batches(cfg.data, tokenizer, split="eval", batch_size=b.eval_batch_size, seed=cfg.seed,
                           num_epochs=1)
        return sft.evaluate(eval_step, full(state.params), (to_global(r, mesh) for r in rows))

    has_eval = cfg.data.eval_split is not None or cfg.data.eval_split_ratio > 0

    # 5. The loop.
    seq_len = row_length(cfg.data)
    writers = metrics_lib.Writers(str(out), t.report_to, total_steps=total, initial_step=int(state.step),
                                  run_name=cfg.run, config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    try:
        result = loop.train_loop(
            state, train_step, lambda _: to_global(next(batches), mesh), total_steps=total, writers=writers,
            logging_steps=t.logging_steps, eval_fn=evaluate if has_eval else None, eval_steps=t.eval_steps,
            checkpointer=checkpointer, data_state=batches.get_state,
            flops_per_token=metrics_lib.flops_per_token(cfg.model, seq_len, param_count(cfg.model)),
            peak_flops=metrics_lib.peak_flops_per_device(jax.devices()[0], t.peak_flops_per_device))
    finally:
        writers.close()
        checkpointer.close()

    # 6. Export.
    hf_dir = None
    if t.save_final_model and result.stopped_by == "max_steps":
        hf_dir = str(out / "hf")
        model = nnx.merge(graphdef, full(result.state.params))
        save_pretrained(lora.merge_adapters(model) if frozen is not None else model, hf_dir, tokenizer=tokenizer)
    print(f"{cfg.run}: {result.step} steps ({result.stopped_by}); outputs in {out} "
          f"(config.yaml, metrics.jsonl, checkpoints/{', hf/' if hf_dir else ''})", flush=True)
    return {"output_dir": str(out), "checkpoints": str(out / "checkpoints"), "hf_dir": hf_dir,
            "steps": result.step, "stopped_by": result.stopped_by, "metrics": result.last_metrics}
