"""Offline lm-eval tasks over small JSONL files shipped in eval/tasks/data, and the paper's zero-shot suite.

Hub task data cannot be downloaded everywhere (and not in CI): `write_local_tasks(dir)` writes task YAMLs with
absolute data paths (lm-eval resolves relative `data_files` against the process CWD) for the three request kinds:
  metala_local_mc      multiple choice (acc, acc_norm)
  metala_local_piqa    the real piqa prompt (`include:` of lm-eval's piqa.yaml) over a local file in piqa's schema
  metala_local_ppl     rolling log-likelihood (word/byte perplexity, bits per byte)
  metala_local_gen     generate_until with a stop sequence (exact match)
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
LOCAL_TASKS = ["metala_local_mc", "metala_local_piqa", "metala_local_ppl", "metala_local_gen"]

# the paper's zero-shot suite (metala.md section 10) and the metric it reports per task
PAPER_COMMONSENSE = ["logiqa", "wsc273", "boolq", "piqa", "hellaswag", "winogrande", "arc_challenge", "openbookqa"]
PAPER_EXTRA = ["lambada_openai", "arc_easy"]
PAPER_SUPERGLUE = ["wsc", "wic", "sglue_rte", "cb", "multirc", "copa"]
PAPER_METRIC = {
    "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
    "lambada_openai": "perplexity", "metala_local_ppl": "word_perplexity", "metala_local_gen": "exact_match",
}


def _yaml(name: str, body: str) -> str:
    return f"task: {name}\n{body.strip()}\n"


def write_local_tasks(out_dir: str | Path) -> Path:
    """Write the local task YAMLs into out_dir and return it (pass it as lm-eval's include_path)."""
    import lm_eval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    piqa_yaml = Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml"
    files = {
        "metala_local_mc": f"""
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'mc.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
        "metala_local_piqa": f"""
include: {piqa_yaml}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {DATA / 'piqa_local.jsonl'}
training_split: null
validation_split: validation
""",
        "metala_local_ppl": f"""
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'ppl.jsonl'}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
        "metala_local_gen": f"""
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'gen.jsonl'}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""",
    }
    for name, body in files.items():
        (out / f"{name}.yaml").write_text(_yaml(name, body))
    return out
