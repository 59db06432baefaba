"""Reverse Cuthill-McKee reordering for extremely sparse arbitrary masks (the paper's second optimisation).

RCM renumbers the tokens so that the non-zeros of the symmetrised mask gather near the diagonal, which
leaves fewer non-empty tiles for the kernels to visit."""
import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import reverse_cuthill_mckee


def rcm_permutation(allowed: torch.Tensor) -> torch.Tensor:
    """One permutation (int64, (N,)) for a square bool mask (Bm, Hm, N, N), from the union of its
    batches and heads: token ``perm[i]`` moves to position ``i``."""
    n = allowed.shape[-1]
    pattern = allowed.reshape(-1, n, n).any(0)
    rows, cols = pattern.nonzero(as_tuple=True)
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    graph = coo_matrix((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n)).tocsr()
    graph = (graph + graph.T).tocsr()
    perm = reverse_cuthill_mckee(graph, symmetric_mode=True)
    return torch.from_numpy(np.ascontiguousarray(perm).astype(np.int64))
