"""dedup: find and remove duplicate and near-duplicate images in training sets."""
