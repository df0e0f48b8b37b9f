"""Hooks at the stages of a run: how tools that explain or measure the loop see it without copying it.

`train.main(cfg, observer)` calls the observer's methods as the run reaches each stage, with what the
stage made. `python -m yoda_raw.trace` prints every stage from them; `meter.MemoryReport` counts
where the memory went; the benchmarks read the same. An observer only looks: whatever it does, the
run computes the same numbers. Every method here does nothing; a tool overrides those it needs.

The stages, in run order (the steps' hooks come once a step):
    settled       the configuration as run, its precision and its fast-path plan
    data          conversations -> held-out split -> packed rows
    base_model    the base model as loaded (4-bit weights, before LoRA)
    adapted       the model with LoRA (and the fast path's levers) on
    loop_start    the prepared model, optimizer and loader; the step counts
    micro_batches a step's micro-batches and its loss denominator
    backward_done the step's summed loss; gradients are in .grad
    before_update the clipped gradients' norm; the optimizer has not stepped
    updated       the optimizer has stepped; gradients not yet zeroed
    logged        a record, as written to metrics.jsonl
"""


class Observer:
    def settled(self, cfg, precision, plan, accelerator) -> None:
        pass

    def data(self, tokenizer, conversations, train_conversations, held_out, rows) -> None:
        pass

    def base_model(self, model) -> None:
        pass

    def adapted(self, model) -> None:
        pass

    def loop_start(self, model, optimizer, loader, steps_per_epoch: int, total_steps: int) -> None:
        pass

    def micro_batches(self, step: int, micro_batches: list[dict], n_supervised) -> None:
        pass

    def backward_done(self, step: int, step_loss, step_fn) -> None:
        pass

    def before_update(self, step: int, grad_norm, optimizer) -> None:
        pass

    def updated(self, step: int, lr: float, optimizer) -> None:
        pass

    def logged(self, record: dict) -> None:
        pass
