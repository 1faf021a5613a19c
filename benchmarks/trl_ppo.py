"""TRL 0.9.6's PPOTrainer (the authors' trainer) timed like bench_ppo.py times this repository's PPO
iteration.

It runs in its own environment (trl 0.9.6, transformers 4.44.2; see docs/speed.md) and is started by
`python benchmarks/bench_ppo.py --trl_python=PATH`, which prints both side by side. The same work as
bench_ppo.py: a random T5 of the given size (policy with TRL's value head and a reference copy), 32
random 64-token contexts, replies of exactly 30 sampled tokens generated in one batch of 32, a
random score per reply, then `step`: 4 PPO epochs over minibatches of 8 with gradient accumulation
4, adaptive KL from 0.2. Prints one JSON line.

    /path/to/trl-env/bin/python benchmarks/trl_ppo.py '{"vocab_size": 8000, ...}' STEPS
    [FLUSH_DENORMAL: 0|1]
"""

import json
import resource
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer


def main(size, steps, flush_denormal=False):
    torch.set_flush_denormal(flush_denormal)
    torch.manual_seed(0)
    config = T5Config(**size, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with tempfile.TemporaryDirectory() as d:  # TRL's wrappers load from a directory
        T5ForConditionalGeneration(config).save_pretrained(d)
        policy = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(d)
        ref = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(d)
    # only the special ids matter: contexts are random ids and nothing is decoded
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    ppo_config = PPOConfig(
        batch_size=32,
        mini_batch_size=8,
        gradient_accumulation_steps=4,
        ppo_epochs=4,
        learning_rate=1e-5,
        init_kl_coef=0.2,
        adap_kl_ctrl=True,
        seed=0,
        log_with=None,
    )
    trainer = PPOTrainer(ppo_config, policy, ref, tok)
    queries = [torch.randint(3, size["vocab_size"], (64,)) for _ in range(32)]
    generation = dict(
        min_new_tokens=30,
        max_new_tokens=30,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    times, rollouts = [], []
    for step in range(steps + 1):  # the first iteration warms up and is not counted
        t0 = time.perf_counter()
        responses = trainer.generate(queries, batch_size=32, **generation)
        t1 = time.perf_counter()
        trainer.step(queries, responses, [torch.rand(()) for _ in queries])
        t2 = time.perf_counter()
        if step:
            times.append(t2 - t0)
            rollouts.append(t1 - t0)
    print(
        json.dumps(
            dict(
                seconds_per_step=min(times),
                rollout_seconds=min(rollouts),
                threads=torch.get_num_threads(),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                reply_tokens=len(responses[0]),
            )
        )
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "1")
