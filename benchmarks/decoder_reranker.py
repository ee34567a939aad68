"""Part e of `make bench`: an LLM reranker of Qwen3-Reranker-0.6B's shape (Qwen3ForCausalLM, 28 layers,
hidden 1024, its real config; seeded random weights; yes/no answer tokens read after its chat template)
served through the same batcher as the encoders, against sentence-transformers' CrossEncoder.predict
on the same pairs and threads in the same run. Also checks that the two give the same scores.

The tokenizer is the tests' small byte-level BPE with the Qwen3-Reranker template (the real 151k-token
vocabulary is not on disk here; token ids fall inside the model's real vocabulary size)."""

from __future__ import annotations

import sys
from pathlib import Path

import common
import numpy as np

sys.path.insert(0, str(common.REPO / "tests"))

# Qwen/Qwen3-Reranker-0.6B's config.json (Qwen3-0.6B): what sets the cost of a pass.
QWEN3_06B = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151669, "max_position_embeddings": 40960,
             "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
SMOKE = {**QWEN3_06B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}


def qwen3_reranker(shape: dict, name: str) -> Path:
    def build(folder: Path) -> None:
        import torch
        from transformers import Qwen3Config, Qwen3ForCausalLM

        import family_factory

        tokenizer = family_factory.qwen_tokenizer(folder, family_factory.RERANKER_TEMPLATE)
        torch.manual_seed(21)
        config = Qwen3Config(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        Qwen3ForCausalLM(config).eval().save_pretrained(folder)

    return common._built(common.CACHE / f"{name}-{common.MODEL_VERSION}", build)


def run(args, scratch: Path, text: common.Text, summary: list, smoke: bool, device: str = "cpu") -> None:
    """On CUDA the server runs its default precision (fp16) and CrossEncoder.predict fp32: the score
    difference is then printed, not held to the fp32 bound."""
    from rankstream.v1 import rankstream_pb2 as pb

    common.heading(f"LLM reranker: Qwen3-Reranker-0.6B shape (causal LM, yes/no logits, chat template), {device}")
    model_dir = qwen3_reranker(SMOKE if smoke else QWEN3_06B, "qwen3-reranker-smoke" if smoke else "qwen3-reranker-0.6b-shape")
    cuda = device.startswith("cuda")
    # ~30-word passages; on 2 CPU cores a 0.6B model in fp32 scores well under a pair a second.
    per_request = 4 if smoke else 100 if cuda else 8
    requests = common.rerank_requests(text, 2 if smoke else 32 if cuda else 2, per_request, model="qwen3")
    requests = [pb.RerankRequest(query=r.query, model="qwen3", raw_scores=True, passages=[
        pb.Passage(id=p.id, text=" ".join(p.text.split()[:30])) for p in r.passages]) for r in requests]
    pairs = common.pairs_of(requests)
    threads = getattr(args, "threads", 1)
    config = {"server": {"torch_threads": 1}, "batching": {"cpu_passes": threads},
              # CPU: float32 like CrossEncoder.predict, so the score difference is held to the fp32 bound
              # (dtype auto may measure bfloat16 faster); CUDA: the server's default precision.
              "models": [{"name": "qwen3", "weights": str(model_dir), "device": device, "dtype": "auto" if cuda else "float32"}]}
    reference_model = common.load_crossencoder(model_dir, device)
    with common.Server(config, scratch, name="decoder") as server:
        info = common.model_info(server.address)["qwen3"]
        print(f"server up in {server.startup_seconds:.1f} s; {info.architecture}, head {info.head}, "
              f"{info.padding_side} padding, {info.template}; {info.parallel_passes} passes of "
              f"{info.max_batch_tokens} padded tokens side by side")
        fidelity = _max_difference(server, requests[0], reference_model)
        reference = common.crossencoder_rate(reference_model, pairs, batch_size=per_request, device=device, watch=[server.pid])
        load = common.drive(server, "Rerank", requests, clients=len(requests), calls=len(requests), max_seconds=600,
                            model="qwen3")
        common.check(load, per_request)
    ratio = load.rate / reference.per_second
    print(f"workload: {len(pairs)} pairs, {len(requests)} clients x {per_request} passages of ~30 words, "
          f"{'server ' + info.dtype + ' on ' + device if cuda else common.cores_note(threads)}")
    common.table(
        ["path", "pairs/s", "vs CrossEncoder.predict", "others CPU %"],
        [
            [f"sentence-transformers CrossEncoder.predict ({reference.note})", reference.per_second, 1.0, reference.other_pct],
            [f"rankstream Rerank over gRPC ({load.calls} calls)", load.rate, ratio, load.other_pct],
        ],
    )
    print(f"max |server - CrossEncoder.predict| over {len(requests[0].passages)} pairs (raw logit difference): {fidelity:.2e}")
    common.warn_others([reference.other_pct, load.other_pct])
    where = "GPU" if cuda else "CPU"
    summary += [
        [f"{where} Qwen3-Reranker-0.6B shape: server / CrossEncoder.predict", ratio, ">= 1.0",
         common.verdict(ratio, 1.0, others=[reference.other_pct, load.other_pct])],
        [f"{where} Qwen3-Reranker-0.6B shape: max score difference vs CrossEncoder.predict", f"{fidelity:.1e}",
         "-" if cuda else "<= 1e-4", f"{info.dtype} vs fp32" if cuda else common.verdict(fidelity, 1e-4, higher_is_better=False)],
    ]


def _max_difference(server: common.Server, request, reference_model) -> float:
    import grpc
    import torch

    from rankstream.v1 import rankstream_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        scored = [p for message in pb_grpc.RerankerStub(channel).Rerank(request, timeout=600) for p in message.passages]
    got = np.empty(len(request.passages), dtype=np.float32)
    for passage in scored:
        got[passage.index] = passage.score
    expected = reference_model.predict([(request.query, p.text) for p in request.passages],
                                       activation_fn=torch.nn.Identity(), show_progress_bar=False)
    return float(np.max(np.abs(got - np.asarray(expected, dtype=np.float32))))
