"""Time to first token per chat turn, with the conversation's KV cache kept between turns (as
`genkit chat` does) and without it (every turn prefills the whole conversation again).

    python benchmarks/chat_ttft.py [--model DIR|FILE.gguf] [--native-4bit] [--turns 10] [--new-tokens 32] [--threads 2]

One process, one loaded model, greedy. Each turn runs the kept-cache session first, then a
generation from scratch on the same conversation, and checks that both give the same tokens.
Prints one line per turn: prompt tokens, how many the kept cache had to prefill, and both
times to first token.
"""

from __future__ import annotations

import argparse
import json
import sys

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Tell me one famous museum there and what it is known for.",
    "How would I get there from the main railway station?",
    "What else is worth seeing within walking distance of it?",
    "Suggest a good time of year to visit, and explain why.",
    "What local food should I try, and where would I find it?",
    "Is it expensive? Give me a rough daily budget for a traveller.",
    "Which day trips from the city would you recommend?",
    "What should I pack for a week there in spring?",
    "Summarise your advice in three short points.",
    "Thank you. Anything else I should know before I go?",
    "Which phrases of the local language are useful to learn?",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--native-4bit", action="store_true", help="the GGUF's 4-bit weights as they are")
    ap.add_argument("--json", action="store_true", help="one JSON object per turn")
    args = ap.parse_args(argv)
    if not 1 <= args.turns <= len(QUESTIONS):
        ap.error(f"--turns must be between 1 and {len(QUESTIONS)}")

    import torch

    import genkit
    from genkit.chat import ChatSession
    from genkit.engine import Generation

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = genkit.load(args.model, native_4bit=args.native_4bit)
    params = {"max_new_tokens": args.new_tokens, "do_sample": False}
    genkit.generate(lm, "Warm up.", **params)  # first-call costs (kernels, allocations) out of turn 1

    session = ChatSession(lm, overrides=params)
    same_everywhere = True
    for turn, question in enumerate(QUESTIONS[: args.turns], 1):
        for _ in session.ask(question):
            pass
        kept = session.last
        scratch = Generation(lm, [session.messages[:-1]], session.settings, system=session.system)
        scratch.run()
        same = scratch.results[0].token_ids == session.last_result.token_ids
        same_everywhere &= same
        row = {
            "turn": turn, "prompt_tokens": kept.prompt_tokens, "prefilled_tokens": kept.prompt_tokens - kept.reused_tokens,
            "ttft_kept_s": round(kept.time_to_first_token_s, 4),
            "ttft_scratch_s": round(scratch.stats.time_to_first_token_s, 4), "same_tokens": same,
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(f"turn {turn:2}: prompt {row['prompt_tokens']:5} tokens, prefilled {row['prefilled_tokens']:4}; "
                  f"first token {row['ttft_kept_s'] * 1000:7.1f} ms kept cache, "
                  f"{row['ttft_scratch_s'] * 1000:7.1f} ms from scratch; same tokens: {'yes' if same else 'NO'}")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
