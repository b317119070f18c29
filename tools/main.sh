#!/usr/bin/env bash
# The main job: the course's whole pipeline on a CPU in a few minutes, on the built-in corpus.
#   data (tiny world) -> pretrain a 1 M-parameter model -> SFT from it -> stream three chat answers
# Everything goes to out/main/ (the data too, so a dataset/ of your own is never touched).
# The same steps at full size on a GPU: drop the size flags (see README, "Training, chat and DDP").
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/install.sh
unset MPLBACKEND
# OpenMP's default wait policy spins between parallel regions. On an idle CPU that is the fastest (measured here:
# 25-40 % more training tokens/s than OMP_WAIT_POLICY=PASSIVE); on a CPU busy with another job it is the slowest
# (2x slower with one core busy, several-fold with more). On a busy machine, run
#   OMP_WAIT_POLICY=PASSIVE bash tools/main.sh

WORK=out/main
SIZE=(--dim 128 --n_layers 4 --n_heads 4 --n_kv_heads 2 --device cpu)
RUN=(--batch_size 16 --accumulation_steps 1 --log_interval 100 --eval_interval 150 --save_interval 300 --out_dir "$WORK")

echo "== 1/4 data: the built-in tiny-world corpus"
python -m zer02llm.corpus --out "$WORK/dataset"

echo "== 2/4 pretraining (two passes over the corpus, ~1180 steps of 16 x 128 tokens: to store the facts, to copy)"
python zer02llm/train.py --mode pretrain --data_path "$WORK/dataset/pretrain_hq.jsonl" "${SIZE[@]}" "${RUN[@]}" \
    --max_seq_len 128 --learning_rate 4e-3 --warmup_iters 20 --epochs 2

# The validation lines score the held-out questions found beside the data: eval_facts and eval_entities.
# 200 steps: one pass over the SFT data. At step 50 this run answered 91 % of the held-out facts and 88 % of the
# held-out people's questions; from step 100 on, all of both.
echo "== 3/4 supervised fine-tuning from $WORK/pretrain_128.pth (200 steps of 16 conversations: one pass)"
python zer02llm/train.py --mode sft --data_path "$WORK/dataset/sft_data.jsonl" "${SIZE[@]}" "${RUN[@]}" \
    --max_seq_len 64 --learning_rate 5e-4 --warmup_iters 10 --max_steps 200 --eval_interval 50

echo "== 4/4 chat (streamed token by token)"
# A held-out fact (eval_facts.jsonl) and a held-out person (eval_entities.jsonl): no question-and-answer text of
# the corpus asks about either, so the answers come from what pretraining read.
for question in "What is Elmsworth famous for?" "Where does Edric Frost live?" "Tell me a short story."; do
    echo "user: $question"
    printf "assistant: "
    python -m zer02llm.chat --checkpoint "$WORK/sft_128.pth" --prompt "$question" \
        --temperature 0 --repetition_penalty 1.2 --max_new_tokens 64 --device cpu
done
