# Stage 3b (PTM-ST): an expert trajectory straightened over a window of epochs, the targets
# of a distillation with distill.shortcut [a, b].


rule shortcut_expert:
    input:
        "results/{dataset}/experts/{model}/expert_{i}.h5",
    output:
        "results/{dataset}/experts/{model}/shortcut_{a}_{b}/expert_{i}.h5",
    log:
        "results/logs/{dataset}/experts/{model}/shortcut_{a}_{b}/expert_{i}.log",
    wildcard_constraints:
        a=r"\d+",
        b=r"\d+",
    conda:
        "../../envs/vldd.yaml"
    threads: 1
    shell:
        "python -m vldd --threads {threads} shortcut-expert --expert {input:q}"
        " --window {wildcards.a:q} {wildcards.b:q} --out {output:q} > {log:q} 2>&1"
