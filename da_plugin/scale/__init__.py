"""EnSF at scale: cycling on a Lorenz-96 state split over ranks, from one process to many GPUs or nodes.

``python -m da_plugin.scale CONFIG [key=value ...]`` runs it (under torchrun, mpiexec or srun);
``tools/ensf_problem_gen.py`` writes a sharded problem for it. One concept per module:

=================  ==================================================================================
``config``         ``ScaleConfig``: the run's settings (observations are a ``da_plugin.obs.ObsConfig``)
``launch``         this rank's place in the job (torchrun, mpiexec, srun), the process group, its device
``slabs``          the decomposition: slabs, halo exchange, the slab RK4 step, the slab's EnSF analysis
``twin``           truth, observations and initial ensemble from counter-based draws, slab by slab
``problem``        the problem directory format (shards + meta.json): its writer and its reader
``problem_gen``    the problem generator's command line (``tools/ensf_problem_gen.py``)
``run``            the cycling loop, its summary and the ``python -m da_plugin.scale`` command line
=================  ==================================================================================

The analysis itself is :class:`da_plugin.filters.ensf.EnSF`; its noise comes from
:mod:`da_plugin.counter_rng`, shared with the filters, so any rank count gives the same numbers.
"""
