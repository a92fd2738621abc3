"""Issue 15: record, by script and with their reasons, the corrections once made to results by hand.

Two files under ``experiments/results/issue6/`` were edited or written by hand:

- ``results.json``: the ``allocated p80`` run's ``target_param_ratio`` was changed from 0.5212 to
  0.8 without a rerun, and a ``superseded`` block was pasted in. The two numbers measure different
  things: 0.5212 is the ratio over the modules that were factored (what the script wrote then),
  0.8 the ratio over all decoder linear layers, the modules allocation left dense counted at full
  size (what the budget means). This script derives both, for every run, from the config stored
  in the run itself and the model's shapes (no weights, no rerun): ``param_ratio_factored_modules``
  and ``param_ratio_all_linears``; ``target_param_ratio`` (one name, two meanings) is dropped. The
  ``superseded`` run is kept, with the reason it was added by hand and why it is not reproducible.
- ``recover-p80-snapshots.json``: perplexities of intermediate recovery states, written by no
  script. The numbers are kept as they were, named by what they are, with that said in the file.

``experiments/results/allocation/results.json`` used ``target_param_ratio`` for the ratio over all
selected decoder linears, the opposite of the library's name; renamed, with the ratio over the
factored modules derived from each run's recorded ranks.

``experiments/results/bytes_frontier/int8_sensitivity.json`` (a cache the library reads) lost the
provenance of the runs that measured it: a later run that measured nothing re-stamped it. The
measuring runs are recorded under ``measured_by`` (numbers unchanged).

Three speed results of 2026-12-07 (``experiments/results/speed/{pivoted_before_fused,
gemv_pivoted_fused,pivoted_2d}/speed_threads.json``) ran with ``OMP_WAIT_POLICY=PASSIVE`` on the
command line (the commands in BENCHMARKS.md), which neither the script nor the provenance recorded
then; the setting changes the 2-thread numbers by up to 1.6x. Recorded under ``omp_wait_policy``
(numbers unchanged).

Every correction is listed under ``corrections`` with its reason; ``table.md`` is rewritten from the
corrected file as ``refine_recover.py`` writes it. The files are rewritten through
:func:`svdcompress.provenance.write_results`, so it names this command and the code version.
Running it twice changes nothing but the provenance.

    python experiments/record_corrections.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from svdcompress.compress import resolve_ranks
from svdcompress.config import config_from_dict
from svdcompress.provenance import write_results
from svdcompress.targets import find_targets
from svdcompress.zoo import resolve_model_spec

RESULTS = Path("experiments/results/issue6")
MODEL = "smollm2-135m"

RATIO_REASON = (
    "target_param_ratio meant two things in this file: for allocated runs the script wrote the "
    "ratio over the factored modules only (allocated p80: 0.5212), which was then changed by hand "
    "to the ratio over all decoder linears (0.8) without a rerun. Both are now derived by this "
    "script from each run's stored config and the model's shapes, under names that say what they "
    "measure; target_param_ratio is removed."
)
SUPERSEDED_REASON = (
    "added by hand (commit f5a855d) from a run of a code state that no longer exists (refinement "
    "then fitted the cross objective); the run's folder was deleted, so it cannot be regenerated. "
    "Kept as a record of why the objective changed, not as a current result."
)
SNAPSHOT_REASON = (
    "written by hand (commit f5a855d), by no script: held-out Wikipedia perplexity of the recovery "
    "states saved at steps 100 and 150 (checkpoint_every 50) of a 200-step p80 recovery. The run "
    "is not named in the file; at that commit results.json held one p80 recovery, "
    "'whiten+refine+recover p80' (44.26 at step 200), which these numbers fit. The evaluation "
    "command was not recorded; the numbers are kept unchanged and no table uses them."
)
SNAPSHOT_RUN = "whiten+refine+recover p80 (results.json), attributed from the commit, not recorded"


def _targets(model_spec: str, config) -> tuple[list, list]:
    """(factored targets, all targets the config selects) of the model, built without weights."""
    hf_config = AutoConfig.from_pretrained(resolve_model_spec(model_spec))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    return find_targets(model, config.targets, config.exclude), find_targets(model, config.targets)


def param_ratios(config_dict: dict, model_spec: str = MODEL) -> dict[str, float]:
    """Parameters kept / before over the factored modules, and over all selected decoder linears
    (modules left dense by ``exclude`` counted at full size)."""
    config = config_from_dict(config_dict)
    factored, selected = _targets(model_spec, config)
    ranks = resolve_ranks(config, factored)
    dense = {t.name: t.out_features * t.in_features for t in selected}
    after = {t.name: ranks[t.name] * (t.out_features + t.in_features) for t in factored}
    if config.storage == "dense":
        after = {name: dense[name] for name in after}
    kept_all = sum(after.get(name, size) for name, size in dense.items())
    return {
        "param_ratio_factored_modules": round(sum(after.values()) / sum(dense[n] for n in after), 4),
        "param_ratio_all_linears": round(kept_all / sum(dense.values()), 4),
    }


def _config_of(run: dict, runs: dict) -> dict | None:
    if "config" in run:
        return run["config"]
    source = runs.get(run.get("source_run", ""))
    return None if source is None else _config_of(source, runs)


def correct_results(data: dict) -> dict:
    runs = data["runs"]
    for run in [*runs.values(), *data.get("superseded", {}).values()]:
        config = _config_of(run, runs)
        ratios = {"param_ratio_factored_modules": 1.0, "param_ratio_all_linears": 1.0} \
            if config is None else param_ratios(config)
        run.pop("target_param_ratio", None)
        run.update(ratios)
    for run in data.get("superseded", {}).values():
        run["recorded_by_hand"] = SUPERSEDED_REASON
    corrections = [c for c in data.get("corrections", []) if c["field"] not in ("ratios", "superseded")]
    data["corrections"] = [
        *corrections,
        {"field": "ratios", "runs": sorted(runs), "reason": RATIO_REASON},
        {"field": "superseded", "reason": SUPERSEDED_REASON},
    ]
    return data


ALLOCATION_REASON = (
    "target_param_ratio in this file was the ratio over all selected decoder linears (modules left "
    "dense counted at full size), while the library's CompressionReport.target_param_ratio is the "
    "ratio over the factored modules only. Renamed param_ratio_all_linears (values unchanged); "
    "param_ratio_factored_modules derived by this script from each run's recorded ranks and the "
    "model's shapes."
)


def factored_ratio(ranks: dict[str, int], model_spec: str = MODEL) -> float:
    """Parameters kept / before over the modules factored at the given ranks."""
    factored, _ = _targets(model_spec, config_from_dict({"method": "svd", "rank": 1}))
    shapes = {t.name: (t.out_features, t.in_features) for t in factored}
    after = sum(rank * sum(shapes[name]) for name, rank in ranks.items())
    return round(after / sum(m * n for m, n in (shapes[name] for name in ranks)), 4)


def correct_allocation(data: dict) -> dict:
    for run in data["runs"].values():
        if "target_param_ratio" in run:
            run["param_ratio_all_linears"] = run.pop("target_param_ratio")
        if "param_ratio_factored_modules" not in run:
            run["param_ratio_factored_modules"] = factored_ratio(run["ranks"]) if run.get("ranks") else 1.0
    return data


def correct_snapshots(data: dict) -> dict:
    if "wiki_ppl_by_recovery_step" not in data:  # the hand-written form: {"100": ppl, ...}
        data = {"wiki_ppl_by_recovery_step": dict(data)}
    data["run"] = SNAPSHOT_RUN
    data["corrections"] = [{"field": "wiki_ppl_by_recovery_step", "reason": SNAPSHOT_REASON}]
    return data


INT8_PATH = Path("experiments/results/bytes_frontier/int8_sensitivity.json")
INT8_MEASURED_BY = [
    {"modules": 62, "command": "bytes_frontier.py (previous session's run, not recorded)",
     "code_version": {"commit": "3becfe3 (committed afterwards, as found in the tree)"}},
    {"modules": 148, "command": "experiments/bytes_frontier.py --threads 1 --checks-only",
     "code_version": {"package": "0.1.0", "commit": "52de21db427c5e03723a16eaba2f06d6619dad9e", "dirty": True},
     "written_at": "2026-12-03T16:33:46+00:00"},
]
INT8_REASON = (
    "62 modules were measured by the previous session's run (its file had no provenance, committed "
    "in 3becfe3) and the other 148 by `bytes_frontier.py --threads 1 --checks-only` at 52de21d, "
    "the provenance this file carried in commit 6154afb. A later `bytes_frontier.py --threads 1` "
    "(8e83053) found every module cached, measured nothing, and re-stamped the file (a "
    "stamp_results call since removed), replacing that provenance; the file without its provenance "
    "is identical in 6154afb and b39d203. `seconds` was not recorded by that code (0)."
)


def correct_int8_provenance(data: dict, earlier: dict | None) -> dict:
    data["measured_by"] = INT8_MEASURED_BY
    corrections = [c for c in data.get("corrections", []) if c["field"] != "measured_by"]
    data["corrections"] = [*corrections, {"field": "measured_by", "reason": INT8_REASON,
                                          "earlier_provenance": earlier}]
    return data


SPEED_PATHS = [Path(f"experiments/results/speed/{name}/speed_threads.json")
               for name in ("pivoted_before_fused", "gemv_pivoted_fused", "pivoted_2d")]
SPEED_REASON = (
    "run with OMP_WAIT_POLICY=PASSIVE set on the command line (BENCHMARKS.md, issue 14, session of "
    "2026-12-07), which speed_threads.py and the provenance did not record before that day; with "
    "torch imported before svdcompress, the library's own default never applied to these runs."
)


def correct_speed_environment(data: dict) -> dict:
    """The OpenMP setting a speed run used, recorded with its reason (numbers unchanged)."""
    earlier = data.pop("provenance", None)
    if not any(c["field"] == "omp_wait_policy" for c in data.get("corrections", [])):
        data["corrections"] = [*data.get("corrections", []), {
            "field": "omp_wait_policy", "reason": SPEED_REASON, "earlier_provenance": earlier}]
    data["omp_wait_policy"] = "PASSIVE"
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=RESULTS)
    parser.add_argument("--allocation", type=Path, default=Path("experiments/results/allocation/results.json"))
    parser.add_argument("--only", choices=["issue6", "int8", "speed"], help="one group of corrections (default: all)")
    args = parser.parse_args()
    if args.only in (None, "speed"):
        for path in SPEED_PATHS:
            write_results(path, correct_speed_environment(json.loads(path.read_text())))
            print(f"recorded corrections in {path}")
    if args.only == "speed":
        return
    if args.only in (None, "int8"):
        data = json.loads(INT8_PATH.read_text())
        earlier = data.pop("provenance", None)
        if any(c["field"] == "measured_by" for c in data.get("corrections", [])):
            earlier = next(c for c in data["corrections"] if c["field"] == "measured_by")["earlier_provenance"]
        write_results(INT8_PATH, correct_int8_provenance(data, earlier))
        print(f"recorded corrections in {INT8_PATH}")
    if args.only == "int8":
        return
    for name, correct in (("results.json", correct_results),
                          ("recover-p80-snapshots.json", correct_snapshots)):
        path = args.folder / name
        data = json.loads(path.read_text())
        data.pop("provenance", None)
        write_results(path, correct(data))
        print(f"recorded corrections in {path}")
    path = args.allocation
    data = json.loads(path.read_text())
    earlier = data.pop("provenance", None)
    if not any(c["field"] == "param_ratio_all_linears" for c in data.get("corrections", [])):
        data["corrections"] = [*data.get("corrections", []), {
            "field": "param_ratio_all_linears", "reason": ALLOCATION_REASON,
            "earlier_provenance": earlier}]
    write_results(path, correct_allocation(data))
    print(f"recorded corrections in {path}")
    # the table refine_recover.py writes, rebuilt from the corrected file
    from refine_recover import results_table

    (args.folder / "table.md").write_text(results_table(json.loads((args.folder / "results.json").read_text())))


if __name__ == "__main__":
    main()
