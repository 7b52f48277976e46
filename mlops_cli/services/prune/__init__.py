"""`mlops prune`: magnitude/random pruning with honest figures, and real structural shrinking.

Unstructured pruning (torch.nn.utils.prune) only writes zeros into dense tensors: the file keeps its
size and dense kernels their speed; the saving shows once the file is compressed (or with sparse
kernels). So every run reports sparsity, raw and compressed sizes, the drift against the unpruned model
(the parity engine) and latency before/after, measured, never assumed. `--structured-shrink` removes whole
channels (Torch-Pruning's dependency graph for plain modules, whole feed-forward neurons for Hugging Face
transformers) so parameters, MACs and the file really shrink; the result loads back through mlops.

Modules: options (what is asked), targets (what is pruned), unstructured and shrink (how), sizes, artefact
(writing and reloading), verdict (the words), pipeline (one run).
"""

from __future__ import annotations

from mlops_cli.core.contract import ModelRef
from mlops_cli.services.prune.options import METHODS, PruneOptions
from mlops_cli.services.prune.report import (
    AmountResult,
    Drift,
    LatencyFigures,
    LayerChange,
    PruneReport,
    SizeFigures,
)

__all__ = ["METHODS", "AmountResult", "Drift", "LatencyFigures", "LayerChange", "PruneOptions", "PruneReport",
           "SizeFigures", "run"]


def run(ref: ModelRef, options: PruneOptions) -> PruneReport:
    """Load MODEL, prune it at each amount, measure, and write each result like the input (when -o is given)."""
    from mlops_cli.core.inputs import plan_inputs
    from mlops_cli.core.io import check_output
    from mlops_cli.core.loading import load_model
    from mlops_cli.core.runtimes import gather_on_cpu, run_device, use_threads
    from mlops_cli.services.prune.artefact import output_paths
    from mlops_cli.services.prune.options import validate_options
    from mlops_cli.services.prune.pipeline import Pruner
    from mlops_cli.services.prune.targets import check_prunable

    validate_options(options)
    use_threads(options.threads)
    outputs = output_paths(ref, options)
    for path in outputs.values():  # fail fast, before loading anything
        check_output(path, options.force, ref.sources)
    options.on_step("loading")
    loaded = load_model(ref, options.load)
    gather_on_cpu(loaded, "pruning")
    device = run_device(loaded, options.device)  # a gathered model stays on CPU for --device auto
    loaded.reference = ref.text  # a weights folder loads as its weights file; the report names the folder
    check_prunable(loaded)
    plan = plan_inputs(loaded, options.inputs)
    return Pruner(ref, loaded, plan, options, device).run(outputs)
