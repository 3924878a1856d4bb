"""The quality study's parts (docs/quality.md): not a library, the code behind two benchmark scripts.

Entry points: `benchmarks/quality.py` (the study: its command line, plan and main) and
`benchmarks/structure_tasks.py` (the structure-sensitive tasks, which reuse the baselines). A script puts the
benchmarks folder on sys.path and imports the modules it needs, e.g. `from study.baselines import baseline_trainers`:

    common      the task and method names, CACHE_VERSION, Settings (part of every cache key), digest, log
    tasks       ClsTask (MiniLM genre classification) and LmTask (a small Llama from scratch)
    baselines   random_units_mask and the magnitude / movement pruning trainers (baseline_trainers())
    runs        RunSpec (a run and its cache key), execute (train and evaluate one run), Cache
    estimators  the estimator-variance study
    report      summarize, compute_targets, the tables, the plots and write_report

Imports only go down this list (report also uses estimators' names); nothing here imports transformers at import
time.
"""
