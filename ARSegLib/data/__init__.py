"""Data readers (LIDC-IDRI crops, BraTS slices), augmentation and intensity preparation."""
