"""Ad-embedding index for serving: exact top-k for small catalogs, FAISS IVF above a configured size."""

from adrec.index.ann import AdIndex, build_index, exact_top_k, measure_recall, recall_at_k

__all__ = ["AdIndex", "build_index", "exact_top_k", "measure_recall", "recall_at_k"]
