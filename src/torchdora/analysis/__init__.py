"""Weight-decomposition analysis (DoRA paper §2.2, figure 2): how far training moves each
adapted layer's row magnitudes (ΔM) and directions (ΔD), for DoRA, LoRA and full fine-tuning,
and plots of that and of loss curves.

Measuring needs only PyTorch; the plots need matplotlib (``pip install 'torchdora[analysis]'``).
"""

from torchdora.analysis.change import LayerChange, dense_change, factored_change
from torchdora.analysis.figure2 import (
    PAPER_CHECKPOINTS,
    format_relations,
    relations,
    select_checkpoints,
    select_module_type,
)
from torchdora.analysis.plots import plot_decomposition, plot_loss_curves
from torchdora.analysis.records import (
    DECOMPOSITION_FILE,
    METRICS_FILE,
    decomposition_points,
    decomposition_record,
    method_correlations,
    pearson,
    read_decomposition,
    read_jsonl,
    read_loss_curves,
)
from torchdora.analysis.reference import (
    LayerReference,
    capture_reference,
    decomposition_change,
    state_dict_change,
    weight_rows,
)
from torchdora.analysis.runs import DECOMPOSITION_PLOT, LOSS_PLOT, RELATIONS_FILE, analyze_runs
from torchdora.analysis.tracking import DecompositionTracker, infer_method

__all__ = [
    "DECOMPOSITION_FILE",
    "DECOMPOSITION_PLOT",
    "LOSS_PLOT",
    "METRICS_FILE",
    "PAPER_CHECKPOINTS",
    "RELATIONS_FILE",
    "DecompositionTracker",
    "LayerChange",
    "LayerReference",
    "analyze_runs",
    "capture_reference",
    "decomposition_change",
    "decomposition_points",
    "decomposition_record",
    "dense_change",
    "factored_change",
    "format_relations",
    "infer_method",
    "method_correlations",
    "pearson",
    "plot_decomposition",
    "plot_loss_curves",
    "read_decomposition",
    "read_jsonl",
    "read_loss_curves",
    "relations",
    "select_checkpoints",
    "select_module_type",
    "state_dict_change",
    "weight_rows",
]
