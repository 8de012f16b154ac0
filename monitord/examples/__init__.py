"""Teaching by example: banks of embeddings with labels (``bank``), kNN scores (``knn``), and a
rule's taught false alarms (``suppress``)."""
