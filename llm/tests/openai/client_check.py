"""The official OpenAI Python client against `cleave-llm master`'s HTTP API.

Run by llm/tests/openai_client.rs (which starts a worker and a master on loopback) as

    python client_check.py --base-url http://127.0.0.1:PORT/v1

or by hand against any running master. Every check asserts; the first that fails ends the
script with a traceback and a non-zero status. Nothing here is specific to cleave-llm beyond
what OpenAI's API promises, except the names of the error codes.
"""

import argparse
import sys

import openai


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--context", type=int, default=256,
                        help="the server's --context (to make a prompt that is too long)")
    args = parser.parse_args()

    # No retries: a 502 or a 503 must surface, not be hidden by the client's backoff.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0,
                           timeout=300)

    models = client.models.list().data
    check(len(models) == 1, f"one model listed, got {models}")
    model = models[0].id
    check(isinstance(model, str) and model, "the model has a name")
    print(f"ok: models.list -> {model!r}")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                           temperature=0)
    choice = whole.choices[0]
    text = choice.message.content
    check(isinstance(text, str) and text.strip(), f"a non-empty answer, got {text!r}")
    check(choice.message.role == "assistant", choice.message.role)
    check(choice.finish_reason in ("stop", "length"), choice.finish_reason)
    usage = whole.usage
    check(usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16, usage)
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage)
    print(f"ok: chat.completions.create -> {text!r} ({choice.finish_reason}, {usage})")

    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    check(all(c.id == chunks[0].id for c in chunks), "one id for the whole stream")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"the stream says what the whole answer said: {streamed!r}")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    check(finishes[-1] == choice.finish_reason and not any(finishes[:-1]), finishes)
    check(chunks[-1].usage is not None
          and chunks[-1].usage.completion_tokens == usage.completion_tokens, chunks[-1])
    print(f"ok: chat.completions.create(stream=True) -> {len(chunks)} chunks, same text")

    prompt = "The capital of France is"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                           temperature=0)
    ctext = completion.choices[0].text
    check(ctext and completion.choices[0].finish_reason == "length", completion)
    check(completion.usage.completion_tokens == 12, completion.usage)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    check(streamed == ctext, f"{streamed!r} != {ctext!r}")
    print(f"ok: completions.create -> {ctext!r}, streamed alike")

    # A stop text taken from the greedy answer cuts it there.
    words = ctext.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                        temperature=0, stop=[stop])
        check(cut.choices[0].finish_reason == "stop", cut)
        check(cut.choices[0].text == ctext[:ctext.index(stop)],
              f"{cut.choices[0].text!r} is {ctext!r} cut before {stop!r}")
        print(f"ok: stop={stop!r} -> {cut.choices[0].text!r}")

    def sampled(seed):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me a short story."}],
            max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return answer.choices[0].message.content

    first = sampled(1234)
    check(sampled(1234) == first, "the same seed gives the same answer")
    others = [sampled(seed) for seed in (7, 99)]
    check(any(o != first for o in others), f"other seeds give other answers: {others}")
    print(f"ok: seed 1234 repeats {first!r}; other seeds differ")

    def refused(what, expected_param=None, expected_code=None, **kwargs):
        try:
            client.chat.completions.create(model=model, **kwargs)
        except openai.BadRequestError as e:
            check(e.status_code == 400, e.status_code)
            body = e.body if isinstance(e.body, dict) else {}
            check(body.get("type") == "invalid_request_error", body)
            if expected_param is not None:
                check(body.get("param") == expected_param, body)
            if expected_code is not None:
                check(e.code == expected_code, e.code)
            print(f"ok: {what} -> 400 {body.get('message')!r}")
            return
        raise AssertionError(f"{what} was accepted")

    refused("n=2", "n", messages=messages, n=2)
    refused("an unknown role", "messages[0].role",
            messages=[{"role": "wizard", "content": "hi"}])
    refused("a prompt longer than the context", expected_code="context_length_exceeded",
            messages=[{"role": "user", "content": "word " * (args.context + 10)}])
    refused("temperature 5", "temperature", messages=messages, temperature=5)

    print("all OpenAI client checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        raise
