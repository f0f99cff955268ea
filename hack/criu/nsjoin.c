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
 *   STASIS_NSJOIN         comma-separated fds of /proc/<pid>/ns/ files, joined in that order
 *                         (the cgroup namespace first, the mount namespace last)
 *   STASIS_NSJOIN_CGROUPS_OF  a host PID (optional): join that process's cgroups, in every
 *                         hierarchy, right after joining the cgroup namespace (a restore: the
 *                         restored tasks are CRIU's children and must be the container's, limits
 *                         and accounting included)
 * A pid namespace applies to children only, so after joining the constructor forks: the child
 * runs CRIU in the container's pid namespace, the parent waits and exits with the child's status.
 * The child dies with the parent (PR_SET_PDEATHSIG), so killing the process the agent started
 * stops CRIU.
 * Optional STASIS_NSJOIN_CRED="uid:gid": the child then runs CRIU as that user with only the
 * capabilities a dump needs (see switch_cred).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
/* switch_cred */
#include <grp.h>
#include <linux/capability.h>

static void die(const char *what, int fd)
{
	dprintf(2, "stasis-nsjoin: %s (fd %d): %s\n", what, fd, strerror(errno));
	_exit(126);
}

/*
 * The capabilities a dump as the app's user keeps (measured with CRIU 4.2.1 --unprivileged; with
 * fewer: "Can't setns 13/mnt"). Not CAP_SYS_RESOURCE: that one is why this exists at all (reading
 * another uid's rlimits needs it, and some VMs withhold it even from root).
 */
static const int dump_caps[] = {
	CAP_CHECKPOINT_RESTORE, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_CHROOT, CAP_DAC_OVERRIDE,
	CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_KILL, CAP_SETUID, CAP_SETGID, CAP_NET_ADMIN,
};

/*
 * switch_cred switches the process to cred ("uid:gid", no supplementary groups) with exactly
 * dump_caps effective and permitted (inheritable and ambient empty, the bounding set untouched):
 * as the app's own user, CRIU may read the app's rlimits without CAP_SYS_RESOURCE. The uid change
 * also leaves the process non-dumpable, and its capabilities exceed the app's: the app's user can
 * neither ptrace CRIU nor read its memory.
 */
static void switch_cred(const char *cred)
{
	char *end;
	unsigned long uid = strtoul(cred, &end, 10), gid;
	if (end == cred || *end != ':' || uid > 0xfffffffeUL)
		goto bad;
	cred = end + 1;
	gid = strtoul(cred, &end, 10);
	if (end == cred || *end || gid > 0xfffffffeUL)
		goto bad;

	/* Without KEEPCAPS, leaving uid 0 clears the permitted set. */
	if (prctl(PR_SET_KEEPCAPS, 1) < 0)
		die("PR_SET_KEEPCAPS", -1);
	if (setgroups(0, NULL) < 0)
		die("setgroups", -1);
	if (setresgid(gid, gid, gid) < 0)
		die("setresgid", -1);
	if (setresuid(uid, uid, uid) < 0)
		die("setresuid", -1);

	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3};
	struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {0};
	for (size_t i = 0; i < sizeof(dump_caps) / sizeof(dump_caps[0]); i++) {
		data[CAP_TO_INDEX(dump_caps[i])].effective |= CAP_TO_MASK(dump_caps[i]);
		data[CAP_TO_INDEX(dump_caps[i])].permitted |= CAP_TO_MASK(dump_caps[i]);
	}
	if (syscall(SYS_capset, &hdr, data) < 0)
		die("capset", -1);
	if (prctl(PR_SET_KEEPCAPS, 0) < 0)
		die("PR_SET_KEEPCAPS", -1);
	return;
bad:
	errno = EINVAL;
	die("bad STASIS_NSJOIN_CRED (want uid:gid)", -1);
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

/*
 * join_cgroups_of moves this process into the cgroups of process pid, hierarchy by hierarchy. The
 * agent's own view of the cgroup trees may be its container's subtree only, so each hierarchy is
 * mounted afresh in a private mount namespace (a copy of the agent's, thrown away when the
 * container's is joined): seen from the cgroup namespace just joined, its root is the one the
 * target's /proc/<pid>/cgroup paths are relative to. The memory, cpu and pids hierarchies and the
 * unified one must succeed (limits and accounting); a failure of another is reported and skipped.
 */
static void join_cgroups_of(const char *pid)
{
	char path[4096], line[4096];
	if (unshare(CLONE_NEWNS) < 0)
		die("unshare(CLONE_NEWNS) for the cgroup mounts", -1);
	if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		die("making the private mount namespace private", -1);
	if (mount("stasis-cgroups", "/tmp", "tmpfs", 0, "mode=0700") < 0)
		die("tmpfs for the cgroup mounts", -1);
	snprintf(path, sizeof(path), "/proc/%s/cgroup", pid);
	FILE *f = fopen(path, "re");
	if (!f)
		die("reading the target's cgroups", -1);
	int n = 0;
	while (fgets(line, sizeof(line), f)) {
		char *ctrls = strchr(line, ':'), *cg;
		if (!ctrls || !(cg = strchr(ctrls + 1, ':')))
			continue;
		*ctrls++ = 0;
		*cg++ = 0;
		cg[strcspn(cg, "\n")] = 0;
		char dir[64], opts[512], procs[4096 + 80];
		snprintf(dir, sizeof(dir), "/tmp/%d", n++);
		mkdir(dir, 0700);
		int v2 = *ctrls == 0;
		if (!strncmp(ctrls, "name=", 5))
			snprintf(opts, sizeof(opts), "none,%s", ctrls);
		else
			snprintf(opts, sizeof(opts), "%s", ctrls);
		int vital = v2 || strstr(ctrls, "memory") || !strcmp(ctrls, "pids") || strstr(ctrls, "cpu,") ||
			    !strcmp(ctrls, "cpu");
		if (mount("cgroup", dir, v2 ? "cgroup2" : "cgroup", 0, v2 ? NULL : opts) < 0) {
			if (vital)
				die(ctrls, -1);
			dprintf(2, "stasis-nsjoin: cgroup hierarchy %s: %s (skipped)\n", ctrls, strerror(errno));
			continue;
		}
		snprintf(procs, sizeof(procs), "%s%s/cgroup.procs", dir, cg);
		int fd = open(procs, O_WRONLY | O_CLOEXEC);
		char self[32];
		int len = snprintf(self, sizeof(self), "%d\n", getpid());
		if (fd < 0 || write(fd, self, len) != len) {
			if (vital)
				die(procs, fd);
			dprintf(2, "stasis-nsjoin: joining %s: %s (skipped)\n", procs, strerror(errno));
		}
		if (fd >= 0)
			close(fd);
	}
	fclose(f);
}

static const char *cgroups_of;

static void join_ns(int fd)
{
	if (setns(fd, 0) < 0)
		die("setns", fd);
	close(fd);
	/* The cgroup namespace comes first: right after it, the cgroups (see join_cgroups_of). */
	if (cgroups_of) {
		join_cgroups_of(cgroups_of);
		cgroups_of = NULL;
	}
}

__attribute__((constructor)) static void nsjoin(void)
{
	const char *ns = getenv("STASIS_NSJOIN");
	if (!ns)
		return;
	cgroups_of = getenv("STASIS_NSJOIN_CGROUPS_OF");
	each_fd(ns, join_ns);
	unsetenv("STASIS_NSJOIN");
	unsetenv("STASIS_NSJOIN_CGROUPS_OF");

	pid_t child = fork();
	if (child < 0)
		die("fork", -1);
	if (child == 0) {
		/* No getppid() check after it: the parent is outside the new pid namespace (getppid()
		 * is 0 here). Had the parent died before prctl, CRIU would find its RPC socket closed
		 * by the agent and exit. Set after switch_cred: a uid change clears it. The switch is
		 * the child's alone: the parent, still root, only waits. */
		const char *cred = getenv("STASIS_NSJOIN_CRED");
		if (cred) {
			switch_cred(cred);
			unsetenv("STASIS_NSJOIN_CRED");
		}
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
