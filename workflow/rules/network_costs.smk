# Attention cost (RSA against non-local) and speed of every variant: not part of
# `all`; run it on an otherwise idle machine with `snakemake network_costs` (it times things).


rule network_costs:
    output:
        attention=report(
            "results/benchmarks/attention_cost.csv",
            caption="../report/benchmark.rst",
            category="Benchmarks",
        ),
        networks=report(
            "results/benchmarks/networks.csv",
            caption="../report/benchmark.rst",
            category="Benchmarks",
        ),
        table="results/benchmarks/benchmark.md",
        figure=report(
            "results/benchmarks/attention_cost.png",
            caption="../report/benchmark.rst",
            category="Benchmarks",
        ),
        json="results/benchmarks/benchmark.json",
    log:
        "logs/benchmark.log",
    conda:
        ENV
    threads: job_resources("train")["threads"]
    resources:
        mem_mb=6000,
        runtime=20,
    params:
        train=section("train"),
        variants=VARIANT_IDS,
        rounds=7,
        memory_budget_mib=1500,
    script:
        "../../scripts/benchmark.py"
