/*
 * nsjoin.so: preloaded into CRIU by the stasis agent (`ld.so --preload`).
 *
 * Why: CRIU must run inside a container's namespaces, but the agent is privileged and must never
 * load, execute or parse as root anything the pod can write. Entering the mount namespace before
 * exec (as nsenter does) lets the dynamic loader read the container's /etc/ld.so.preload and
 * resolve libraries in the container's filesystem. Preloaded, this constructor runs after the
 * loader has mapped CRIU and every library from the agent's own files and before CRIU's main: only
 * then are the namespaces joined.
 *
 * Input (environment, removed before main):
 *   STASIS_NSJOIN_CGROUP  comma-separated fds of cgroup.procs files to join first (optional)
 *   STASIS_NSJOIN         comma-separated fds of /proc/<pid>/ns/ files, joined in that order
 * A pid namespace applies to children only, so after joining the constructor forks: the child
 * runs CRIU in the container's pid namespace, the parent waits and exits with the child's status.
 * The child dies with the parent (PR_SET_PDEATHSIG), so killing the process the agent started
 * stops CRIU.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what, int fd)
{
	dprintf(2, "stasis-nsjoin: %s (fd %d): %s\n", what, fd, strerror(errno));
	_exit(126);
}

/* each_fd calls fn for every fd of a comma-separated list. */
static void each_fd(const char *list, void (*fn)(int))
{
	char *end;
	while (list && *list) {
		long fd = strtol(list, &end, 10);
		if (end == list || fd < 0 || fd > 65535) {
			errno = EINVAL;
			die("bad fd list", -1);
		}
		fn((int)fd);
		list = *end == ',' ? end + 1 : end;
	}
}

static void join_cgroup(int fd)
{
	char pid[32];
	int n = snprintf(pid, sizeof(pid), "%d\n", getpid());
	if (write(fd, pid, n) != n)
		die("joining the cgroup", fd);
	close(fd);
}

static void join_ns(int fd)
{
	if (setns(fd, 0) < 0)
		die("setns", fd);
	close(fd);
}

__attribute__((constructor)) static void nsjoin(void)
{
	const char *ns = getenv("STASIS_NSJOIN");
	if (!ns)
		return;
	each_fd(getenv("STASIS_NSJOIN_CGROUP"), join_cgroup);
	each_fd(ns, join_ns);
	unsetenv("STASIS_NSJOIN");
	unsetenv("STASIS_NSJOIN_CGROUP");

	pid_t child = fork();
	if (child < 0)
		die("fork", -1);
	if (child == 0) {
		/* No getppid() check after it: the parent is outside the new pid namespace (getppid()
		 * is 0 here). Had the parent died before prctl, CRIU would find its RPC socket closed
		 * by the agent and exit. */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
			die("PR_SET_PDEATHSIG", -1);
		return; /* on to CRIU's main, inside the namespaces */
	}
	/* The parent holds nothing CRIU needs: closing its fds lets the agent see CRIU's EOF. */
	syscall(SYS_close_range, 0, ~0U, 0);
	int status;
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			_exit(126);
	if (WIFSIGNALED(status))
		_exit(128 + WTERMSIG(status));
	_exit(WEXITSTATUS(status));
}
