"""Find the lesions most similar to a query lesion, by image embedding and by image + metadata.

    python examples/retrieve_similar_lesions.py --model_dir outputs/slimp-synthetic --dataset_dir data/synthetic \
        --index_split train --query_split test --query_index 0 --k 5

Builds an embedding index of `--index_split` with `training.embeddings.embed_split` (whole patients per
batch), embeds the query lesion (row `--query_index` of `--query_split`, or `--query_image_id`) with its
patient's other lesions, and ranks the index by cosine similarity of
- the image embedding, and
- the lesion representation SLIMP pre-trains on: image + lesion-metadata embeddings concatenated (the
  cosine of two such vectors is the mean of the two cosines).
Only image ids, labels and similarities are printed (no patient ids). Cosines of a small or briefly trained model
crowd near 1 (0.99x for every lesion), so each ranking also prints the spread of the query's cosines over the
whole index (median, 99th percentile, max) and each hit's z-score against it: how many standard deviations
above the index's mean the hit lies, which is what says whether a neighbour is close.
"""

from __future__ import annotations

import argparse

import numpy as np

from modeling_slimp import SLIMPModel, SLIMPProcessor
from training.arguments import require_paths
from training.data.collate import DecodingCollator
from training.data.dataset import load_slimp_dataset
from training.embeddings import embed_split


def lesion_vectors(features: dict) -> dict[str, np.ndarray]:
    """Unit vectors to compare: the image embedding, and [image, lesion metadata] / sqrt(2)."""
    embeds = features["projection"]  # the L2-normalised embeddings
    both = np.concatenate([embeds["image"], embeds["lesion"]], axis=1) / np.sqrt(2)
    return {"image": embeds["image"], "image+metadata": both}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a SLIMP checkpoint folder (encoder or classifier)")
    parser.add_argument("--dataset_dir", required=True, help="a dataset from `python -m training.prepare_data`")
    parser.add_argument("--index_split", default="train", help="the split searched")
    parser.add_argument("--query_split", default="test", help="the split of the query lesion")
    parser.add_argument("--query_index", type=int, default=0, help="row of the query lesion in --query_split")
    parser.add_argument("--query_image_id", help="the query lesion's image_id (instead of --query_index)")
    parser.add_argument("--k", type=int, default=5, help="neighbours listed per ranking")
    args = parser.parse_args(argv)
    require_paths(parser, args, "model_dir", "dataset_dir")

    model = SLIMPModel.from_pretrained(args.model_dir).eval()
    collator = DecodingCollator(SLIMPProcessor.from_pretrained(args.model_dir), train=False)
    index, schema = load_slimp_dataset(args.dataset_dir, args.index_split)
    label_names = schema["label"]["names"]
    queries, _ = load_slimp_dataset(args.dataset_dir, args.query_split)
    if args.query_image_id and args.query_image_id not in queries["image_id"]:
        parser.error(f"--query_image_id {args.query_image_id}: not in split '{args.query_split}'")
    if not args.query_image_id and not 0 <= args.query_index < len(queries):
        parser.error(f"--query_index {args.query_index}: split '{args.query_split}' has rows 0 to {len(queries) - 1}")
    row = queries["image_id"].index(args.query_image_id) if args.query_image_id else args.query_index
    index_vectors = lesion_vectors(embed_split(model, index, collator))
    query = queries[row]
    # The query's patient comes along: patient-level inputs are read from the patient's rows.
    patient = queries.filter(lambda patient_id: patient_id == query["patient_id"], input_columns="patient_id")
    position = patient["image_id"].index(query["image_id"])
    query_vectors = lesion_vectors(embed_split(model, patient, collator))
    print(f"query {query['image_id']} ({label_names[query['label']]}), index: {len(index)} lesions of {args.index_split}")

    for name, vectors in index_vectors.items():
        similarity = vectors @ query_vectors[name][position]  # (N,) cosine: every vector has unit norm
        if args.query_split == args.index_split:
            similarity[index["image_id"].index(query["image_id"])] = -np.inf  # not the query itself
        others = similarity[np.isfinite(similarity)]
        mean, std = float(others.mean()), float(others.std()) or 1.0
        print(f"top {args.k} by {name}:")
        print(f"  (cosines to the {len(others)} index lesions: median {np.median(others):+.3f}, 99th percentile "
              f"{np.percentile(others, 99):+.3f}, max {others.max():+.3f}; z = standard deviations above their mean)")
        for rank, i in enumerate(np.argsort(-similarity, kind="stable")[: args.k], start=1):
            hit = index[int(i)]
            print(f"  {rank}. {hit['image_id']}  {label_names[hit['label']]:<10} cosine {similarity[i]:+.3f}  "
                  f"z {(similarity[i] - mean) / std:+.1f}")


if __name__ == "__main__":
    main()
