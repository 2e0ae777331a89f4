! gauss: solve a random dense system A x = b by Gaussian elimination with
! partial pivoting, and check the answer.  AppPot's worked example: a small
! numerical code compiled inside an AppPot image and run as batch jobs.
!
!   gauss N SEED
!
! A is N x N with entries uniform in [-1, 1) from SEED; b = A x_true with
! x_true(i) = 1 + i/N.  Prints N, SEED, the scaled residual
! ||A x - b|| / (||A|| ||x|| N eps) (backward stable: O(1)) and the relative
! error of x; exits 0 when the scaled residual is below 10, 1 when it is not,
! 2 for bad arguments and 3 for a singular matrix.
program gauss
    use, intrinsic :: iso_fortran_env, only: dp => real64, error_unit
    implicit none
    integer :: n, seed, i, info
    integer, allocatable :: piv(:), seeds(:)
    real(dp), allocatable :: a(:, :), lu(:, :), x(:), xtrue(:), b(:), r(:)
    real(dp) :: resid, err
    character(len=32) :: arg

    if (command_argument_count() /= 2) call usage('two arguments expected')
    call get_command_argument(1, arg)
    read (arg, *, iostat=info) n
    if (info /= 0 .or. n < 1 .or. n > 20000) call usage('N must be an integer from 1 to 20000: ' // trim(arg))
    call get_command_argument(2, arg)
    read (arg, *, iostat=info) seed
    if (info /= 0) call usage('SEED must be an integer: ' // trim(arg))

    allocate (a(n, n), lu(n, n), x(n), xtrue(n), b(n), r(n), piv(n))
    call random_seed(size=i)
    allocate (seeds(i))
    seeds = seed + 7919 * [(i, i = 1, size(seeds))]
    call random_seed(put=seeds)
    call random_number(a)
    a = 2.0_dp * a - 1.0_dp
    xtrue = [(1.0_dp + real(i, dp) / n, i = 1, n)]
    b = matmul(a, xtrue)

    lu = a
    call factor(lu, piv, info)
    if (info /= 0) then
        write (error_unit, '(a, i0)') 'gauss: error: the matrix is singular at column ', info
        stop 3, quiet=.true.
    end if
    x = b
    call solve(lu, piv, x)

    r = matmul(a, x) - b
    resid = maxval(abs(r)) / (maxval(sum(abs(a), dim=2)) * maxval(abs(x)) * n * epsilon(1.0_dp))
    err = maxval(abs(x - xtrue)) / maxval(abs(xtrue))
    write (*, '(a, i0, a, i0, a, es10.3, a, es10.3)') 'n=', n, ' seed=', seed, ' scaled_residual=', resid, &
        ' relative_error=', err
    if (resid >= 10.0_dp) then
        write (error_unit, '(a)') 'gauss: error: the scaled residual is too large'
        stop 1, quiet=.true.
    end if

contains

    subroutine usage(message)
        character(len=*), intent(in) :: message
        write (error_unit, '(a)') 'gauss: error: ' // message // ' (usage: gauss N SEED)'
        stop 2, quiet=.true.
    end subroutine usage

    ! LU factorisation in place, row interchanges in piv; info = first zero pivot column (0: none).
    subroutine factor(m, piv, info)
        real(dp), intent(inout) :: m(:, :)
        integer, intent(out) :: piv(:), info
        integer :: k, p, nn
        real(dp) :: row(size(m, 2))
        nn = size(m, 1)
        info = 0
        do k = 1, nn
            p = k - 1 + maxloc(abs(m(k:nn, k)), dim=1)
            piv(k) = p
            if (m(p, k) == 0.0_dp) then
                info = k
                return
            end if
            if (p /= k) then
                row = m(k, :)
                m(k, :) = m(p, :)
                m(p, :) = row
            end if
            m(k+1:nn, k) = m(k+1:nn, k) / m(k, k)
            m(k+1:nn, k+1:nn) = m(k+1:nn, k+1:nn) - spread(m(k+1:nn, k), 2, nn - k) * spread(m(k, k+1:nn), 1, nn - k)
        end do
    end subroutine factor

    ! Solve L U x = P b for x, overwriting b.
    subroutine solve(m, piv, v)
        real(dp), intent(in) :: m(:, :)
        integer, intent(in) :: piv(:)
        real(dp), intent(inout) :: v(:)
        integer :: k, nn
        real(dp) :: t
        nn = size(m, 1)
        do k = 1, nn
            t = v(k)
            v(k) = v(piv(k))
            v(piv(k)) = t
        end do
        do k = 2, nn
            v(k) = v(k) - dot_product(m(k, 1:k-1), v(1:k-1))
        end do
        do k = nn, 1, -1
            v(k) = (v(k) - dot_product(m(k, k+1:nn), v(k+1:nn))) / m(k, k)
        end do
    end subroutine solve

end program gauss
