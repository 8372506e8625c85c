"""Pure forward/backward pairs. No state, no classes: arrays in, arrays out.

Every ``*_backward`` docstring states the derivative it computes; ``npdgm gradcheck``
checks each one against float64 central differences.
"""
from .activations import (ACTIVATIONS, elu_backward, elu_forward, get_activation, leaky_relu_backward,
                          leaky_relu_forward, relu_backward, relu_forward, sigmoid_backward, sigmoid_forward,
                          softplus_backward, softplus_forward, tanh_backward, tanh_forward)
from .gaussian import (kl_std_normal_backward, kl_std_normal_forward, reparameterize_backward,
                       reparameterize_forward)
from .linear import linear_backward, linear_forward
from .losses import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_nll_backward, gaussian_nll_forward,
                     logsumexp_backward, logsumexp_forward, mse_backward, mse_forward)
from .coupling import (PRIORS, SCALE_CLAMPS, affine_coupling_backward, affine_coupling_forward,
                       affine_coupling_inverse, affine_coupling_inverse_backward, diag_scale_backward,
                       diag_scale_forward, diag_scale_inverse, diag_scale_inverse_backward,
                       gaussian_logprob_backward, gaussian_logprob_forward, logistic_logprob_backward,
                       logistic_logprob_forward, logit_backward, logit_forward, logit_inverse,
                       logit_inverse_backward, prior_logprob, prior_noise, scale_clamp_backward,
                       scale_clamp_forward)
from .categorical import (log_softmax_backward, log_softmax_forward, softmax_backward, softmax_ce_backward,
                          softmax_ce_forward, softmax_entropy_backward, softmax_entropy_forward,
                          softmax_expectation_backward, softmax_expectation_forward, softmax_forward)
