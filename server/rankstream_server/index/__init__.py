"""The corpus: the document store, FAISS vectors, the BM25 side, and the Milvus backend."""
