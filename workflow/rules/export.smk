# The study's models for new patients: the best (or the configured) variant exported with its
# model card, and `snakemake segment` applying it to a sheet of new subjects (rsanet-segment's
# steps); subjects of that sheet with a lesion mask form an external test set.


# Is each lesion's agreement informative? Precision by agreement on subjects the models never
# trained on (each split's test predictions, ensembled per subject); shown in the model card.
rule lesion_confidence:
    input:
        predictions=variant_predictions,
        splits="results/splits.json",
        preprocessed=all_test_preprocessed(),
    output:
        lesions="results/tables/lesion_confidence/{variant}_lesions.csv",
        table="results/tables/lesion_confidence/{variant}.csv",
    log:
        "logs/lesion_confidence/{variant}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        segment=section("segment"),
        threshold=config["predict"]["threshold"],
        connectivity=config["evaluation"]["connectivity"],
    script:
        "../../scripts/lesion_confidence.py"


# Lesion confidence that means what it says: a probability that each lesion is real, calibrated
# on the validation subjects' lesions and measured on the test subjects', for a split ensemble
# and (with train.seeds >= 2) a seed ensemble; the export takes the kind chosen on validation.
rule lesion_calibration:
    input:
        predictions=variant_predictions,
        val_predictions=variant_validation_predictions,
        splits="results/splits.json",
        preprocessed=held_out_preprocessed(),
    output:
        record="results/tables/lesion_calibration/{variant}.json",
        lesions="results/tables/lesion_calibration/{variant}_lesions.csv",
        reliability="results/tables/lesion_calibration/{variant}_reliability.csv",
        figure=report(
            "results/figures/lesion_reliability/{variant}.png",
            caption="../report/lesion_reliability.rst",
            category="Figures",
            subcategory="Lesion confidence",
        ),
        pdf="results/figures/lesion_reliability/{variant}.pdf",
    log:
        "logs/lesion_calibration/{variant}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        segment=section("segment"),
        threshold=config["predict"]["threshold"],
        connectivity=config["evaluation"]["connectivity"],
    script:
        "../../scripts/lesion_calibration.py"


rule export:
    input:
        table1="results/tables/table1.csv",
        table2="results/tables/table2.csv",
        models=all_models(),
        # `export.variant: best` is chosen on these (validation subjects), not on Table 1
        health=health_files(),
        confidence=lesion_confidence_tables(),
        # the ensemble kind and the lesion calibrator (chosen and fitted on validation subjects)
        calibration=lesion_calibration_records(),
        # the engine that ran (registration.engine auto resolves per machine), for the card
        records=expand(
            "results/registered/{subject}/registration.json", subject=SUBJECTS
        ),
        # the study's spacing (their median voxel size), for predict.spacing: study
        preprocessed=expand("results/preprocessed/{subject}.npz", subject=SUBJECTS),
    output:
        directory("results/export"),
    log:
        "logs/export.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        choice=config["export"]["variant"],
        config=study_config(),
        subjects=SUBJECTS,
    script:
        "../../scripts/export.py"


rule segment_subject:
    input:
        unpack(new_subject_images),
        export="results/export",
    output:
        prob="results/segment/{new_subject}/lesion_prob.nii.gz",
        prob_sd="results/segment/{new_subject}/lesion_prob_sd.nii.gz",
        lesions="results/segment/{new_subject}/lesions.nii.gz",
        labels="results/segment/{new_subject}/lesion_labels.nii.gz",
        table="results/segment/{new_subject}/lesions.csv",
        columns="results/segment/{new_subject}/lesions.json",
        summary="results/segment/{new_subject}/summary.json",
        qc="results/segment/{new_subject}/qc.png",
    log:
        "logs/segment/{new_subject}.log",
    benchmark:
        "results/benchmarks/jobs/segment/{new_subject}.tsv"
    retries: job_retries()
    conda:
        ENV
    threads: job_resources("predict")["threads"]
    resources:
        mem_mb=attempt_scaled("predict", "mem_mb"),
        runtime=attempt_scaled("predict", "runtime"),
        gpu=job_resources("predict")["gpus"],
    params:
        options=section("segment"),
    script:
        "../../scripts/segment.py"


rule external_test:
    input:
        segmented=expand(
            "results/segment/{new_subject}/lesions.nii.gz", new_subject=NEW_SUBJECTS
        ),
    output:
        csv=report(
            "results/tables/external_test.csv",
            caption="../report/external_test.rst",
            category="Tables",
        ),
        md="results/tables/external_test.md",
    log:
        "logs/external_test.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        masks=new_subject_masks(),
        evaluation=section("evaluation"),
    script:
        "../../scripts/external_test.py"


# One table and one figure for the whole cohort of new subjects.
rule cohort:
    input:
        summaries=expand(
            "results/segment/{new_subject}/summary.json", new_subject=NEW_SUBJECTS
        ),
        tables=expand(
            "results/segment/{new_subject}/lesions.csv", new_subject=NEW_SUBJECTS
        ),
    output:
        csv=report(
            "results/segment/cohort.csv",
            caption="../report/cohort.rst",
            category="New patients",
        ),
        columns="results/segment/cohort.json",
        figure=report(
            "results/figures/cohort.png",
            caption="../report/cohort.rst",
            category="New patients",
        ),
    log:
        "logs/cohort.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        size_bins_mm3=config["evaluation"]["size_bins_mm3"],
    script:
        "../../scripts/cohort.py"


# A BIDS dataset of new subjects (segment_subjects: {bids: ...}) into BIDS-Derivatives, one job per
# subject and session: the files rsanet-bids writes (rsanet.bids_app).
rule bids_segment_case:
    input:
        unpack(bids_case_images),
        export="results/export",
    output:
        prob="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_label-lesion_probseg.nii.gz",
        prob_json="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_label-lesion_probseg.json",
        mask="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_label-lesion_mask.nii.gz",
        mask_json="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_label-lesion_mask.json",
        dseg="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_desc-lesions_dseg.nii.gz",
        dseg_json="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_desc-lesions_dseg.json",
        table="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_lesions.tsv",
        table_json="results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_lesions.json",
        qc="results/derivatives/rsanet/{bids_folder}/figures/{bids_case}_qc.png",
    log:
        "logs/derivatives/{bids_folder}/{bids_case}.log",
    benchmark:
        "results/benchmarks/jobs/derivatives/{bids_folder}/{bids_case}.tsv"
    retries: job_retries()
    conda:
        ENV
    threads: job_resources("predict")["threads"]
    resources:
        mem_mb=attempt_scaled("predict", "mem_mb"),
        runtime=attempt_scaled("predict", "runtime"),
        gpu=job_resources("predict")["gpus"],
    params:
        case=lambda wildcards: BIDS_CASES[wildcards.bids_case],
        bids=lambda wildcards: config["segment_subjects"]["bids"],
        options=section("segment"),
    script:
        "../../scripts/bids_segment_case.py"


rule bids_group:
    input:
        masks=bids_case_outputs(
            "results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_label-lesion_mask.json"
        ),
        tables=bids_case_outputs(
            "results/derivatives/rsanet/{bids_folder}/anat/{bids_case}_lesions.tsv"
        ),
        export="results/export",
    output:
        table="results/derivatives/rsanet/cohort.tsv",
        columns="results/derivatives/rsanet/cohort.json",
        figure="results/derivatives/rsanet/figures/cohort.png",
        description="results/derivatives/rsanet/dataset_description.json",
    log:
        "logs/derivatives/group.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        bids=lambda wildcards: config["segment_subjects"]["bids"],
        size_bins_mm3=config["evaluation"]["size_bins_mm3"],
    script:
        "../../scripts/bids_group.py"


rule segment:
    default_target: False
    input:
        segment_outputs(),
