"""BibTeX of the papers behind each loss module (sentence-transformers puts a loss's ``citation``
in the model card it writes)."""

from __future__ import annotations

BSC = """
@inproceedings{chernyavskiy2022batchsoftmax,
    title = {Batch-Softmax Contrastive Loss for Pairwise Sentence Scoring Tasks},
    author = {Chernyavskiy, Anton and Ilvovsky, Dmitry and Kalinin, Pavel and Nakov, Preslav},
    booktitle = {Proceedings of the 2022 Conference of the North American Chapter of the
                 Association for Computational Linguistics: Human Language Technologies},
    year = {2022},
    eprint = {2110.15725},
    archivePrefix = {arXiv},
    url = {https://arxiv.org/abs/2110.15725},
}
"""

INFONCE = """
@misc{oord2018representation,
    title = {Representation Learning with Contrastive Predictive Coding},
    author = {van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
    year = {2018},
    eprint = {1807.03748},
    archivePrefix = {arXiv},
    url = {https://arxiv.org/abs/1807.03748},
}
"""

WEINCE = """
@inproceedings{erol2026softmax,
    title = {When Softmax Fails at the Top: Extreme Value Corrections for {InfoNCE}},
    author = {Erol and Evren and Ozel and Morgan and Ryu and Zheng},
    booktitle = {Proceedings of the 43rd International Conference on Machine Learning (ICML)},
    year = {2026},
    eprint = {2606.00262},
    archivePrefix = {arXiv},
    url = {https://arxiv.org/abs/2606.00262},
}
"""

VRNS = """
@inproceedings{lee2025similarities,
    title = {On the Similarities of Embeddings in Contrastive Learning},
    author = {Lee, Chungpa and Lim, Sehee and Lee, Kibok and Sohn, Jy-yong},
    booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
    year = {2025},
    eprint = {2506.09781},
    archivePrefix = {arXiv},
    url = {https://arxiv.org/abs/2506.09781},
}
"""
