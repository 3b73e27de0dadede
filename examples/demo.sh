#!/usr/bin/env bash
# The llmctl lifecycle on the built-in corpus, on a CPU, in a few minutes:
# tokenizer -> token shards -> pretraining -> val bits-per-byte before/after -> samples -> eval ->
# built-in tasks -> sft -> lora -> exact-match before / after each stage -> report card.
set -euo pipefail
PYTHON=${PYTHON:-python3}
LLMCTL="$PYTHON -m llmctl"
D=${DEMO_DIR:-runs/demo}
STEPS=${DEMO_STEPS:-1000}
mkdir -p "$D"

echo "== 1/4 train a byte-level BPE tokenizer on the builtin corpus" >&2
[ -f "$D/tok/tokenizer.json" ] || $LLMCTL tokenize train builtin --vocab-size 4096 --out "$D/tok"

echo "== 2/4 encode the corpus into token shards" >&2
[ -f "$D/data/meta.json" ] || $LLMCTL tokenize encode builtin --tokenizer "$D/tok" --out "$D/data" --val-fraction 0.05

echo "== 3/4 pretrain a small llama ($STEPS steps)" >&2
$LLMCTL pretrain recipes/tiny/pretrain.yaml out_dir="$D/pretrain" tokenizer="$D/tok" data.train="$D/data" \
  train.max_steps="$STEPS"

echo "== 4/4 results" >&2
$PYTHON - "$D/pretrain/metrics.jsonl" <<'PY'
import json, sys
evals = [e for e in map(json.loads, open(sys.argv[1])) if "val_bpb" in e]
first, last = evals[0], evals[-1]
drop = 1 - last["val_bpb"] / first["val_bpb"]
print(f"val bpb: step {first['step']}: {first['val_bpb']:.3f} -> step {last['step']}: {last['val_bpb']:.3f} "
      f"({drop:.0%} lower)")
PY
echo "greedy sample (llmctl generate):"
printf '%s' "The Python interpreter"
$LLMCTL generate --model "$D/pretrain" --temperature 0 --max-new-tokens 40 "The Python interpreter"
echo "sampled, top-p 0.9, one prompt per line (examples/pipelines.sh has more):"
printf 'The Python interpreter\nA list is\nTo open a file,\n' > "$D/prompts.txt"
$LLMCTL generate --model "$D/pretrain" --top-p 0.9 --max-new-tokens 24 --seed 0 --stop '\n' < "$D/prompts.txt" |
  paste -d '' "$D/prompts.txt" -

echo "== eval: bits per byte (first 40 builtin documents), multiple choice, the lm-eval adapter on a local task, report card" >&2
rm -f "$D/report/evals.jsonl"  # a fresh report card for this run
$LLMCTL eval --model "$D/pretrain" --task bpb --data builtin --limit 40 --report "$D/report"
$LLMCTL eval --model "$D/pretrain" --task mc --data examples/eval/python_mc.jsonl --report "$D/report"
$LLMCTL eval --model "$D/pretrain" --harness python_mc --harness-include examples/eval/tasks --report "$D/report"

EM="--task exact-match --data $D/tasks/rl_test.jsonl --limit 200 --chat --max-new-tokens 16 --report $D/report"
echo "== fine-tuning: built-in verifiable tasks (train / held-out test); exact-match of the pretrained model" >&2
$LLMCTL tasks --out "$D/tasks" > /dev/null
$LLMCTL eval --model "$D/pretrain" $EM
echo "== sft: full fine-tuning on the tasks (loss on the answers only; --show-mask shows which tokens)" >&2
$LLMCTL sft recipes/tiny/sft.yaml init_from="$D/pretrain" data.train="$D/tasks/sft_train.jsonl" \
  out_dir="$D/sft" --show-mask | head -4
$LLMCTL sft recipes/tiny/sft.yaml init_from="$D/pretrain" data.train="$D/tasks/sft_train.jsonl" \
  out_dir="$D/sft" eval.exact_match=null
$LLMCTL eval --model "$D/sft" $EM
echo "== lora: adapters on the sft model (peft), evaluated with --adapter" >&2
$LLMCTL lora recipes/tiny/lora.yaml init_from="$D/sft" data.train="$D/tasks/sft_train.jsonl" \
  out_dir="$D/lora" eval.exact_match=null
$LLMCTL eval --model "$D/sft" --adapter "$D/lora" $EM
printf 'What is the largest of 5, 6, 8, 4?\nSort the digits 5 1 9 6.\n' |
  $LLMCTL generate --model "$D/sft" --adapter "$D/lora" --chat --temperature 0 --max-new-tokens 16

PREF="--task preference --data $D/tasks/pref_test.jsonl --report $D/report"
echo "== dpo: preference pairs (chosen = the right answer, rejected = a near miss); held-out log p(chosen) > log p(rejected)" >&2
$LLMCTL eval --model "$D/pretrain" $PREF
$LLMCTL rlhf recipes/tiny/dpo.yaml init_from="$D/pretrain" data.train="$D/tasks/pref_train.jsonl" \
  data.val="$D/tasks/pref_test.jsonl" out_dir="$D/dpo"
$LLMCTL eval --model "$D/dpo" $PREF
echo "== grpo: the same kinds of questions worded differently (new prompts for the sft model); sampled answers," \
  "rewarded by exact match alone; exact-match before / after" >&2
$LLMCTL tasks --out "$D/tasks-alt" --phrasing alt > /dev/null
ALT="--task exact-match --data $D/tasks-alt/rl_test.jsonl --limit 200 --chat --max-new-tokens 16 --report $D/report"
$LLMCTL eval --model "$D/sft" $ALT
$LLMCTL rlhf recipes/tiny/grpo.yaml init_from="$D/sft" data.train="$D/tasks-alt/rl_train.jsonl" \
  eval.exact_match=null out_dir="$D/grpo" train.max_steps="${GRPO_STEPS:-60}"
$LLMCTL eval --model "$D/grpo" $ALT
echo "report card: $D/report/report.md (curves: $D/report/curves.png)"
