"""`selection_summary`: what one NeuronSelect adapter trains, as a plain dict (read by the model card and the CLI)."""

from __future__ import annotations

from typing import Optional

from peft import PeftModel

from .layer import NeuronSelectLayer


def selection_summary(tuner, adapter_name: Optional[str] = None) -> dict:
    """What one adapter trains: layers, rows (in all, per module type, per language group), parameters, settings.

    Used by the model card and the CLI. ``trainable_params``, ``all_params`` and ``trainable_percent`` are PEFT's
    ``get_nb_trainable_parameters()``, i.e. exactly what ``print_trainable_parameters()`` prints: parameters with
    ``requires_grad`` (row deltas, bias deltas when ``train_bias``, ``modules_to_save`` copies) over every
    parameter of the adapted model, adapters included (a model loaded for inference has 0 trainable).
    ``adapter_params`` counts this adapter's own row, bias and column deltas whether or not they train now (a
    column delta skips the rows the layer also selects, so no weight entry is counted twice).
    """
    adapter_name = adapter_name or tuner.active_adapters[0]
    config = tuner.peft_config[adapter_name]
    layers, rows, total_rows, adapter_params, columns, total_columns = 0, 0, 0, 0, 0, 0
    per_group_columns: dict[str, int] = {}
    per_group: dict[str, int] = {}
    per_type: dict[str, dict[str, int]] = {}
    groups = config.groups
    for name, module in tuner.model.named_modules():
        if isinstance(module, NeuronSelectLayer) and adapter_name in module.neuron_select_indices:
            layers += 1
            k = module.num_rows(adapter_name)
            rows += k
            total_rows += module.out_features
            adapter_params += module.neuron_select_delta[adapter_name].numel()
            if adapter_name in module.neuron_select_bias_delta:
                adapter_params += module.neuron_select_bias_delta[adapter_name].numel()
            kind = per_type.setdefault(name.rsplit(".", 1)[-1], {"layers": 0, "rows": 0, "out_features": 0})
            kind["layers"] += 1
            kind["rows"] += k
            kind["out_features"] += module.out_features
            rg = module.neuron_select_row_groups[adapter_name]
            for gid, group in enumerate(groups):
                per_group[group] = per_group.get(group, 0) + int((rg == gid).sum())
            kc = module.num_columns(adapter_name)
            if kc:
                columns += kc
                adapter_params += module.neuron_select_col_delta[adapter_name].numel()
                kind["columns"] = kind.get("columns", 0) + kc
                kind["in_features"] = kind.get("in_features", 0) + module.in_features
                cg = module.neuron_select_col_groups[adapter_name]
                for gid, group in enumerate(groups):
                    per_group_columns[group] = per_group_columns.get(group, 0) + int((cg == gid).sum())
            total_columns += module.in_features
    # PEFT's definition, called on the tuner: it only iterates named_parameters(), the same tensors as the PeftModel's
    trainable, all_params = PeftModel.get_nb_trainable_parameters(tuner)
    target = config.target_modules
    return {
        "adapter": adapter_name,
        "layers": layers,
        "rows": rows,
        "rows_of_targeted": rows / total_rows if total_rows else 0.0,
        "language_rows": per_group,
        "columns": columns,
        "columns_of_targeted": columns / total_columns if total_columns else 0.0,
        "language_columns": per_group_columns,
        "module_types": dict(sorted(per_type.items())),
        "groups": list(groups),
        "target_modules": sorted(target) if isinstance(target, (set, list, tuple)) else target,
        "trainable_params": trainable,
        "all_params": all_params,
        "trainable_percent": 100.0 * trainable / all_params if all_params else 0.0,
        "adapter_params": adapter_params,
        "settings": {
            key: getattr(config, key)
            for key in ("neuron_ratio", "neuron_init", "seed", "train_bias", "update_path", "modules_to_save")
        },
    }
