"""What the held-out diagnostics add to the README's demo run (`retromae pretrain` with no flags).

The demo trains all-MiniLM-L6-v2 for 100 steps of 16 passages of 128 tokens, and evaluates twice
(step 0 and step 100) on its held-out passages. This builds the demo's model, collator and
held-out set exactly as `retromae pretrain` does, then times, on the same machine in the same
process: building the held-out set, one evaluation (`retromae.diagnostics.evaluate_held_out`), and one
training step (forward, backward, gradient clipping, AdamW) on demo batches. The overhead of the
demo is (building + evaluations x one evaluation) / (steps x one step). Both wall-clock and
process CPU time are reported (medians over --repeats): on a shared machine the CPU time is the
steadier measure.

    python benchmarks/benchmark_diagnostics.py --output benchmarks/results/diagnostics_cpu.json
    python benchmarks/benchmark_diagnostics.py --smoke
"""

import argparse
import json
import statistics
import sys
import time
from itertools import islice

import torch

from retromae.collator import RetroMAECollator
from retromae.corpus import CorpusCounts
from retromae.diagnostics import evaluate_held_out
from retromae.loading import build_model_and_tokenizer
from retromae.run_passages import held_out_set, training_passages
from retromae.run_record import hardware
from retromae.settings import PretrainingSettings, check, resolved


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


def median_times(run, repeats: int) -> dict[str, float]:
    """Median wall and CPU seconds of `run()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = clocks()
        run()
        times.append(since(start))
    return {"wall_seconds": statistics.median(t[0] for t in times), "cpu_seconds": statistics.median(t[1] for t in times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats of an evaluation and of a step. Default: 5.")
    parser.add_argument("--smoke", action="store_true", help="A 2-layer 128-wide fresh model, 2 repeats (pipeline only).")
    parser.add_argument("--output", help="Where the JSON report is written.")
    options = parser.parse_args()

    settings = resolved(PretrainingSettings(output_dir="unused", **(dict(config="tiny", max_length=32) if options.smoke else {})))
    check(settings)
    model, tokenizer = build_model_and_tokenizer(settings)
    collator = RetroMAECollator.from_config(model.config, tokenizer, max_length=settings.max_length, seed=settings.seed)
    held_out_set(settings, None, tokenizer, collator)  # reads the demo corpus once (cached), so building is timed alone
    start = clocks()
    held_out = held_out_set(settings, None, tokenizer, collator)
    building = since(start)

    repeats = 2 if options.smoke else options.repeats
    dataset, _ = training_passages(settings, None, tokenizer, CorpusCounts())
    passages = list(islice(iter(dataset), settings.batch_size * (repeats + 1)))
    batches = iter([collator(passages[i : i + settings.batch_size]) for i in range(0, len(passages), settings.batch_size)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def step():
        model(**next(batches)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    step()  # warm-up
    one_step = median_times(step, repeats)
    evaluate_held_out(model, held_out)  # warm-up
    one_evaluation = median_times(lambda: evaluate_held_out(model, held_out), repeats)

    evaluations = 2  # step 0 and the last step (the demo's --eval-steps, the save interval, exceeds its steps)
    overhead = {
        clock: (building[index] + evaluations * one_evaluation[clock]) / (settings.max_steps * one_step[clock])
        for index, clock in enumerate(("wall_seconds", "cpu_seconds"))
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{hardware(torch.device('cpu'))}, torch {torch.__version__}",
        "settings": {name: getattr(settings, name) for name in ("max_steps", "batch_size", "max_length", "eval_split", "eval_size", "eval_steps")},
        "held_out_passages": len(held_out),
        "building_the_held_out_set": {"wall_seconds": building[0], "cpu_seconds": building[1]},
        "one_evaluation": one_evaluation,
        "one_training_step": one_step,
        "evaluations_in_the_demo": evaluations,
        "demo_overhead": overhead,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if options.output:
        with open(options.output, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
