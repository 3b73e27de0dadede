#!/usr/bin/env bash
# `llmctl generate` in shell pipelines. MODEL: a model dir, a checkpoint or a run dir (default: the demo's run).
#   bash examples/pipelines.sh [MODEL]
set -euo pipefail
M=${1:-runs/demo/pretrain}
LLMCTL="${PYTHON:-python3} -m llmctl"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

printf 'The Python interpreter\nA list is\nTo open a file,\n\nimport os\n' > "$T/prompts.txt"

echo "== one prompt per line in, one completion per line out (newlines escaped as \\n); an empty line is a prompt too"
cat "$T/prompts.txt" | $LLMCTL generate --model "$M" --top-p 0.9 --max-new-tokens 20 --seed 0 > "$T/out.txt"
paste -d '|' "$T/prompts.txt" "$T/out.txt"

echo "== greedy, stop at the first newline, prompt + completion side by side"
$LLMCTL generate --model "$M" --temperature 0 --stop '\n' --max-new-tokens 30 < "$T/prompts.txt" |
  paste -d '' "$T/prompts.txt" -

echo "== a closed pipe ends quietly: the first completion only"
(set +o pipefail  # `yes` itself dies of SIGPIPE
 yes "The Python interpreter" | head -100 | $LLMCTL generate --model "$M" --max-new-tokens 10 --batch-size 4 | head -1)

echo "== JSONL with jq: ids and per-item settings in, completions and token counts out"
jq -cn '[{id: 1, prompt: "A list is", temperature: 0}, {id: 2, prompt: "To open a file,", top_k: 20, seed: 7},
         {id: 3, prompt: "import os", stop: ["\n"], max_new_tokens: 40}] | .[]' |
  $LLMCTL generate --model "$M" --json --max-new-tokens 20 |
  jq -r '"\(.id)\t\(.finish_reason)\t\(.completion_tokens) tokens\t\(.completion | gsub("\n"; " "))"'

echo "== JSONL in, a column out: the prompts of a file, sampled 3 times each with different seeds"
jq -Rc 'select(length > 0) | {prompt: .}' "$T/prompts.txt" | while read -r item; do for s in 1 2 3; do
  echo "$item" | jq -c --argjson s "$s" '. + {seed: $s, id: "\(.prompt)#\($s)"}'; done; done |
  $LLMCTL generate --model "$M" --json --top-p 0.95 --max-new-tokens 12 | jq -r '[.id, .completion] | @tsv'

echo "== beam search, and a chat template (a model trained for chat answers better)"
$LLMCTL generate --model "$M" --num-beams 4 --max-new-tokens 20 "The Python interpreter"
$LLMCTL generate --model "$M" --chat --temperature 0 --max-new-tokens 20 "What is a list?"
