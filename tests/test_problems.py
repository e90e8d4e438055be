"""The reference problems are what their docstrings say."""

import pytest
import torch

from implicitlayers.problems import symmetric_tanh_problem


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_symmetric_tanh_problem_has_the_requested_norm_sign_and_drive(sign):
    problem = symmetric_tanh_problem(12, 5, seed=7, norm=0.9, dominant_sign=sign, drive_scale=0.2)
    eigenvalues = torch.linalg.eigvalsh(problem.weight)
    dominant = eigenvalues[eigenvalues.abs().argmax()]
    assert float(dominant) == pytest.approx(0.9 * sign)
    torch.testing.assert_close(problem.weight, problem.weight.T)
    torch.testing.assert_close(problem.drive.norm(dim=1), torch.full((5,), 0.2 * 12**0.5, dtype=torch.float64))


def test_contraction_rate_is_the_spectral_radius_of_the_jacobian():
    problem = symmetric_tanh_problem(6, 3, seed=1, dominant_sign=None)
    z = torch.randn(3, 6, dtype=torch.float64)
    rates = problem.contraction_rate(z)
    for i in range(3):
        jacobian = torch.func.jacrev(lambda v: problem(v[None].expand(3, -1))[i])(z[i])
        assert float(rates[i]) == pytest.approx(float(torch.linalg.eigvals(jacobian).abs().max()), rel=1e-10)
